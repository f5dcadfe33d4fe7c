"""What the API fuzzing generates, shared by tests/fuzz and bench/api_fuzz.py."""

from __future__ import annotations

import schemathesis


def configure(schema: schemathesis.BaseSchema) -> None:
    """What is generated: requests that fit the schema and requests that break it (which must get a 4xx).

    Not generated: query parameters the document does not name (the API ignores them, as HTTP APIs
    do, rather than refusing a cache-buster) and the Authorization header (every case sends a valid
    token; the auth tests cover missing and wrong ones).
    """
    schema.config.generation.update(
        modes=list(schemathesis.GenerationMode), allow_extra_parameters=False, with_security_parameters=False
    )
