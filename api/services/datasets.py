"""Dataset use cases: receive an upload (multipart or raw body), check it, store it by content, look it up."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.errors import BodyTooLarge, ProblemError, not_found
from api.services.auth import Principal
from api.services.uploads import Upload, UploadCheck, checked_copy, finalise, receive_file, receive_stream
from core.data.errors import TOO_LARGE, DatasetError
from core.data.limits import DEFAULT_LIMITS, DataLimits
from core.schemas import DatasetOut, UploadReport
from core.store import Database, Dataset, get_dataset, register_dataset

log = logging.getLogger("api.datasets")


def datasets_dir(artifacts_dir: Path) -> Path:
    """Where uploads are kept: `<artifacts_dir>/datasets/<sha256><suffix>`."""
    return artifacts_dir.resolve() / "datasets"


def to_out(row: Dataset) -> DatasetOut:
    """The API view of a dataset row."""
    return DatasetOut(
        id=row.id,
        filename=row.filename,
        size=row.size,
        sha256=row.sha256,
        format=row.format,
        created_at=row.created_at,
        report=UploadReport(**row.report) if row.report else None,
    )


async def receive(request: Request, folder: Path) -> Upload:
    """Read the upload into a temporary file: a multipart `file` part, or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=20)
        except (ProblemError, BodyTooLarge):
            raise
        except Exception as exc:  # malformed multipart bodies
            raise ProblemError(400, f"Malformed multipart body: {exc}") from exc
        try:
            part = form.get("file")
            if part is None:
                part = next((v for v in form.values() if isinstance(v, UploadFile)), None)
            if not isinstance(part, UploadFile):
                raise ProblemError(
                    422,
                    "The multipart body has no file part: send the dataset as a field named 'file'",
                    errors=[{"loc": "body.file", "msg": "missing"}],
                )
            return await run_in_threadpool(receive_file, part.file, folder, part.filename)
        finally:
            await form.close()
    filename = request.query_params.get("filename") or request.headers.get("x-filename")
    return await receive_stream(request.stream(), folder, filename)


def _reject_rows(check: UploadCheck) -> ProblemError:
    errors = [{"loc": f"line {e['line']}", "msg": e["msg"]} for e in check.errors]
    if check.rows_total == 0:
        return ProblemError(422, "The uploaded file holds no rows", errors=errors or None)
    first = check.errors[0] if check.errors else {"line": "?", "msg": "unusable"}
    return ProblemError(
        422,
        f"No usable preference rows: all {check.rows_total} rows are bad (first: line {first['line']}: {first['msg']})",
        errors=errors,
    )


def unreadable(exc: DatasetError) -> ProblemError:
    """413 for an uploaded file over a size limit, else 422 naming the line where there is one."""
    msg = exc.reason if exc.line is None else f"line {exc.line}: {exc.reason}"
    status = 413 if exc.kind == TOO_LARGE else 422
    loc = "body" if exc.line is None else f"line {exc.line}"
    return ProblemError(
        status, f"The uploaded file cannot be read: {msg}", errors=[{"loc": loc, "msg": exc.reason}]
    )


async def upload(
    request: Request,
    db: Database,
    principal: Principal,
    artifacts_dir: Path,
    limits: DataLimits = DEFAULT_LIMITS,
) -> tuple[DatasetOut, bool]:
    """Receive, check and store an upload; returns (dataset, created). 422 with per-line errors if unusable."""
    folder = datasets_dir(artifacts_dir)
    received = await receive(request, folder)
    try:
        if received.size == 0:
            raise ProblemError(422, "The upload is empty", errors=[{"loc": "body", "msg": "empty"}])
        try:
            _named, check = await run_in_threadpool(checked_copy, received, limits)
        except DatasetError as exc:
            raise unreadable(exc) from exc
        if check.rows_valid == 0:
            raise _reject_rows(check)
        target = await run_in_threadpool(finalise, received, folder)
    except BaseException:
        received.tmp_path.unlink(missing_ok=True)
        raise

    def record() -> tuple[DatasetOut, bool]:
        with db.write() as session:
            row, created = register_dataset(
                session,
                project=principal.owner,
                sha256=received.sha256,
                filename=received.filename,
                path=str(target),
                size=received.size,
                format=check.format,
                report=check.as_report(),
            )
            return to_out(row), created

    out, created = await run_in_threadpool(record)
    log.info("dataset %s stored (%d bytes, %d rows, created=%s)", out.id, out.size, check.rows_total, created)
    return out, created


def get(db: Database, principal: Principal, dataset_id: str) -> DatasetOut:
    """One dataset visible to the caller (404 otherwise)."""
    with db.read() as session:
        row = get_dataset(session, dataset_id, project=principal.scope)
        if row is None:
            raise not_found("dataset", dataset_id)
        return to_out(row)
