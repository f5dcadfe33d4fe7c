"""Dataset routes: upload (multipart or raw body) and get (logic in api.services.datasets)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from api.deps import DbDep, PrincipalDep, SettingsDep
from api.errors import PROBLEM_JSON, Problem
from api.services import datasets as service
from core.schemas import DatasetOut

router = APIRouter(
    prefix="/v1",
    tags=["datasets"],
    responses={
        code: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": text}
        for code, text in {
            401: "Missing or invalid bearer token",
            404: "No such dataset",
            413: "Upload larger than MINORDPO_MAX_UPLOAD_BYTES, or than MAX_DATASET_BYTES once decompressed",
            422: "Not a usable preference file: `errors` lists the bad lines",
        }.items()
    },
)

UPLOAD_BODY = {
    "requestBody": {
        "description": "A JSONL/JSON/.jsonl.gz/Parquet preference file: multipart field `file`, or the raw body "
        "(then give `?filename=train.jsonl` or let the server sniff the type)",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
        "required": True,
    }
}


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a preference dataset",
    openapi_extra=UPLOAD_BODY,
    responses={
        200: {"model": DatasetOut, "description": "The same bytes were already uploaded to this project"}
    },
)
async def upload_dataset(
    request: Request, response: Response, db: DbDep, settings: SettingsDep, principal: PrincipalDep
) -> DatasetOut:
    """Stored by content (`ds_<sha256 prefix>`); reference the id from a spec's dataset.train or dataset.eval."""
    out, created = await service.upload(
        request, db, principal, settings.artifacts_dir, settings.data_limits()
    )
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/datasets/{out.id}"
    return out


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, summary="Get an uploaded dataset")
def get_dataset(
    dataset_id: Annotated[str, Path(max_length=80)], db: DbDep, principal: PrincipalDep
) -> DatasetOut:
    """Size, digest, detected format and the row report of an upload."""
    return service.get(db, principal, dataset_id)
