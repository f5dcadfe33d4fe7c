"""Offline checks of Dockerfile, .dockerignore and docker-compose.yml: each returns a list of problems."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[2]
IMAGE_SERVICES = {"migrate", "ray-head", "ray-worker", "ray-worker-cpu", "api", "dispatcher"}
RAY_SERVICES = {"ray-head", "ray-worker", "ray-worker-cpu", "dispatcher"}
SHARED_MOUNT = "/data"
# What the image needs from the build context (migrations/: `minordpo db upgrade` runs Alembic from it).
NEEDED_IN_CONTEXT = ["api", "core", "workers", "cli", "migrations", "pyproject.toml", "README.md"]
NEVER_IN_CONTEXT = [".git", ".venv", "var", ".env"]

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(ValueError):
    """A `${VAR:?message}` (or `${VAR?message}`) whose variable is unset."""


# ----- compose interpolation (the subset of the compose spec that our file uses) -----------------------------
def _substitute(text: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return env.get(match.group("plain"), "")
        expr = match.group("braced")
        name_match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr)
        if not name_match:
            raise ValueError(f"bad interpolation ${{{expr}}}")
        name, rest = name_match.group(0), expr[name_match.end() :]
        value = env.get(name)
        if rest == "":
            return value or ""
        for op in (":-", "-", ":?", "?", ":+", "+"):
            if rest.startswith(op):
                arg = rest[len(op) :]
                unset = value is None or (op.startswith(":") and value == "")
                if op in (":-", "-"):
                    return arg if unset else value  # type: ignore[return-value]
                if op in (":?", "?"):
                    if unset:
                        raise MissingVariable(f"{name}: {arg}")
                    return value  # type: ignore[return-value]
                return "" if unset else arg
        raise ValueError(f"bad interpolation ${{{expr}}}")

    return _VAR.sub(one, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """The compose document with `${...}` resolved from `env` (raises MissingVariable like compose does)."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        return _substitute(node, env)
    return node


def required_variables(raw_text: str) -> set[str]:
    """Variables the file demands with `${VAR:?...}`."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", raw_text))


# ----- compose checks -------------------------------------------------------------------------------------
def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as vendored by the check-jsonschema package (Apache-2.0)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))


def schema_problems(doc: dict[str, Any]) -> list[str]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def is_one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def flag(args: list[str], name: str) -> str | None:
    prefix = f"--{name}="
    return next((a[len(prefix) :] for a in args if a.startswith(prefix)), None)


def health_problems(services: dict[str, Any]) -> list[str]:
    """Long-running services have a healthcheck; one-shots say so with `restart: "no"`."""
    problems = []
    for name, svc in services.items():
        if is_one_shot(svc):
            continue
        test = (svc.get("healthcheck") or {}).get("test")
        if svc.get("healthcheck", {}).get("disable") or not test:
            problems.append(f"{name}: long-running service without a healthcheck")
        elif not (isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL")):
            problems.append(f"{name}: healthcheck test must be a CMD or CMD-SHELL list, got {test!r}")
        elif "curl" in " ".join(test) or "wget" in " ".join(test):
            problems.append(f"{name}: healthcheck uses curl/wget, which the image does not have")
    return problems


def dependency_problems(services: dict[str, Any]) -> list[str]:
    """depends_on is long-form; waits for one-shots to succeed and for long-running services to be healthy."""
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"{name}: depends_on must name a condition for each dependency")
            continue
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
                continue
            want = "service_completed_successfully" if is_one_shot(services[dep]) else "service_healthy"
            got = (spec or {}).get("condition")
            if got != want:
                problems.append(f"{name}: depends_on {dep} should be {want}, is {got}")
    return problems


def settings_problems(services: dict[str, Any], field_names: set[str], aliases: set[str]) -> list[str]:
    """Every MINORDPO_* variable set in compose is a real Settings field."""
    problems = []
    for name, svc in services.items():
        for key in environment(svc):
            known = key.removeprefix("MINORDPO_").lower() in field_names or key in aliases
            if key.startswith("MINORDPO_") and not known:
                problems.append(f"{name}: {key} is not a field of core.settings.Settings")
    return problems


def layout_problems(services: dict[str, Any]) -> list[str]:
    """The roles, the shared volume, token auth on Ray, the Jobs API address, nothing internal published."""
    problems = []
    missing = (IMAGE_SERVICES | {"postgres"}) - set(services)
    if missing:
        problems.append(f"missing services: {sorted(missing)}")
    images = {services[s].get("image") for s in IMAGE_SERVICES & set(services)}
    if len(images) != 1:
        problems.append(f"api, dispatcher, migrate and Ray nodes must share one image, got {images}")
    for name in sorted(IMAGE_SERVICES & set(services)):
        svc = services[name]
        mounts = [str(v).split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str) and ":" in v]
        if SHARED_MOUNT not in mounts:
            problems.append(f"{name}: does not mount the shared volume at {SHARED_MOUNT}")
        artifacts = environment(svc).get("MINORDPO_ARTIFACTS_DIR")
        if artifacts and not artifacts.startswith(SHARED_MOUNT + "/"):
            problems.append(f"{name}: MINORDPO_ARTIFACTS_DIR {artifacts} is not on the shared volume")
    tokens = set()
    for name in sorted(RAY_SERVICES & set(services)):
        env = environment(services[name])
        if env.get("RAY_AUTH_MODE") != "token" or not env.get("RAY_AUTH_TOKEN"):
            problems.append(
                f"{name}: Ray token auth is not configured (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN)"
            )
        tokens.add(env.get("RAY_AUTH_TOKEN"))
    if len(tokens) > 1:
        problems.append("Ray services do not share one RAY_AUTH_TOKEN")
    for name in ("postgres", "ray-head", "dispatcher", "ray-worker", "ray-worker-cpu", "migrate"):
        if services.get(name, {}).get("ports"):
            problems.append(f"{name}: publishes ports; only the API may")
    head_args = command_args(services.get("ray-head", {}))
    if head_args[:2] != ["ray", "start"] or "--head" not in head_args or "--block" not in head_args:
        problems.append("ray-head: must run `ray start --head --block`")
    dash_port = flag(head_args, "dashboard-port") or "8265"
    address = urlparse(environment(services.get("dispatcher", {})).get("RAY_ADDRESS", ""))
    if (
        address.scheme not in ("http", "https")
        or address.hostname != "ray-head"
        or str(address.port) != dash_port
    ):
        problems.append(f"dispatcher: RAY_ADDRESS must be the head's Jobs API http://ray-head:{dash_port}")
    for worker in ("ray-worker", "ray-worker-cpu"):
        args = command_args(services.get(worker, {}))
        if flag(args, "address") != f"ray-head:{flag(head_args, 'port') or '6379'}" or "--block" not in args:
            problems.append(f"{worker}: must run `ray start --address=<head GCS> --block`")
    return problems


def api_problems(services: dict[str, Any]) -> list[str]:
    api = services.get("api", {})
    env = environment(api)
    problems = []
    if env.get("MINORDPO_HOST") != "0.0.0.0":
        problems.append("api: MINORDPO_HOST must be 0.0.0.0 inside a container")
    if env.get("MINORDPO_EMBEDDED_DISPATCHER", "").lower() != "false":
        problems.append("api: MINORDPO_EMBEDDED_DISPATCHER must be false (the dispatcher is its own service)")
    if not env.get("MINORDPO_DATABASE_URL", "").startswith("postgresql+psycopg://"):
        problems.append("api: MINORDPO_DATABASE_URL must be a postgresql+psycopg:// URL")
    if not (env.get("MINORDPO_API_TOKENS") or env.get("MINORDPO_API_TOKENS_FILE")):
        problems.append("api: no API tokens configured")
    port = env.get("MINORDPO_PORT", "8000")
    targets = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in api.get("ports", [])]
    if port not in targets:
        problems.append(f"api: container port {port} is not published (ports: {api.get('ports')})")
    test = " ".join((api.get("healthcheck") or {}).get("test") or [])
    if not re.search(rf"127\.0\.0\.1:{port}/(readyz|healthz)", test):
        problems.append("api: healthcheck must probe /readyz or /healthz on the API port")
    return problems


# ----- Dockerfile and .dockerignore -------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_problems(text: str) -> list[str]:
    instructions = dockerfile_instructions(text)
    stages: list[list[tuple[str, str]]] = []
    global_args: dict[str, str] = {}
    for ins, args in instructions:
        if ins == "FROM":
            stages.append([(ins, args)])
        elif stages:
            stages[-1].append((ins, args))
        elif ins == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
    problems = []
    if len(stages) < 2:
        return [f"expected a multi-stage build, found {len(stages)} stage(s)"]
    names = [re.search(r"\bAS\s+(\S+)", s[0][1], re.IGNORECASE) for s in stages]
    if not all(names):
        problems.append("every stage should be named (FROM ... AS name)")
    builder, final = stages[0], stages[-1]
    args = {a.partition("=")[0]: a.partition("=")[2] for i, a in builder if i == "ARG"} | global_args
    if "TORCH_INDEX_URL" not in args or "/whl/cpu" not in args.get("TORCH_INDEX_URL", ""):
        problems.append("builder: ARG TORCH_INDEX_URL must default to the CPU wheel index")
    if "TORCH_VERSION" not in args:
        problems.append("builder: ARG TORCH_VERSION is missing")
    runs = " ".join(a for i, a in builder if i == "RUN")
    if not re.search(r'--index-url "?\$\{?TORCH_INDEX_URL', runs) or "TORCH_VERSION" not in runs:
        problems.append("builder: torch is not installed from ${TORCH_INDEX_URL} at ${TORCH_VERSION}")
    users = [a for i, a in final if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runtime stage must switch to a non-root USER")
    copies = [a for i, a in final if i == "COPY"]
    if not any("--from=" in c and c.split()[-1] == "/opt/venv" for c in copies):
        problems.append("runtime stage must copy the virtual environment from the builder")
    # migrations/ must exist at runtime where core/store/migrate.py looks: beside the installed source.
    editable = re.search(r"pip install [^&]*-e \.", runs)
    if not (editable and any("--from=" in c and c.split()[-2:] == ["/app", "/app"] for c in copies)):
        problems.append("runtime stage must carry the source tree (with migrations/) of an editable install")
    if not any(i in ("CMD", "ENTRYPOINT") and "minordpo" in a for i, a in final):
        problems.append("the image's default command must be `minordpo ...`")
    return problems


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` exclude top-level `path` (last match wins, `!` re-includes)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/").removeprefix("**/")
        if fnmatch.fnmatch(path, pat):
            result = not negate
    return result


def dockerignore_problems(text: str) -> list[str]:
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    problems = [
        f".dockerignore excludes {p}, which the image needs"
        for p in NEEDED_IN_CONTEXT
        if ignored(p, patterns)
    ]
    problems += [f".dockerignore does not exclude {p}" for p in NEVER_IN_CONTEXT if not ignored(p, patterns)]
    return problems
