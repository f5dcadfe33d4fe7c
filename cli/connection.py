"""How the remote commands reach the server: --url/--token (or MINORDPO_URL/MINORDPO_TOKEN) and one-line errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import httpx
import typer
from pydantic import ValidationError

from cli.output import fail
from cli.specfile import SpecFileError
from core.spec import error_lines
from minordpo_client import ApiError, Client, ClientError, ServerUnreachableError, WaitTimeoutError
from minordpo_client.client import DEFAULT_URL

UrlOption = Annotated[str, typer.Option("--url", envvar="MINORDPO_URL", help="Server URL", show_envvar=True)]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="MINORDPO_TOKEN", help="Bearer token", show_envvar=True, show_default=False
    ),
]
DEFAULT = DEFAULT_URL


@contextmanager
def connected(url: str, token: str | None) -> Iterator[Client]:
    """A client for the command; any error becomes `error: ...` on stderr and exit 1 (2 for bad input)."""
    for noisy in ("httpx", "httpcore"):  # request logs are for services; the CLI prints its own lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    client: Client | None = None
    try:
        client = Client(url, token or None, retries=2)
        yield client
    except ApiError as exc:
        hint = " (set --token or MINORDPO_TOKEN)" if exc.status == 401 else ""
        raise fail(f"{exc.detail}{hint}", 2 if exc.status in (400, 409, 413, 422) else 1) from None
    except ServerUnreachableError:
        raise fail(
            f"cannot reach the server at {url} (is `minordpo serve` running? set --url or MINORDPO_URL)"
        ) from None
    except (WaitTimeoutError, ClientError) as exc:
        raise fail(str(exc)) from None
    except SpecFileError as exc:
        raise fail(str(exc), 2) from None
    except ValidationError as exc:
        raise fail("invalid spec: " + "; ".join(error_lines(exc)), 2) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 2) from None
    finally:
        if client is not None:
            client.close()
