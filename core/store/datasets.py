"""Uploaded datasets: content-addressed (`ds_<sha256 prefix>`) per project, registered idempotently."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.store.ids import dataset_id
from core.store.models import Dataset, utcnow
from core.store.projects import dialect_insert, ensure_project


def register_dataset(
    session: Session,
    *,
    project: str,
    sha256: str,
    filename: str,
    path: str,
    size: int,
    format: str,
    report: dict[str, Any] | None = None,
) -> tuple[Dataset, bool]:
    """Record an uploaded file; returns (dataset, created). The same bytes in the same project
    return the existing row (its first filename, path and report are kept). Raises ValueError for
    a malformed sha256."""
    ds_id = dataset_id(sha256)
    ensure_project(session, project)
    inserted = session.scalar(
        dialect_insert(session, Dataset)
        .values(
            project=project,
            id=ds_id,
            filename=filename,
            path=path,
            size=size,
            sha256=sha256.lower(),
            format=format,
            report=report,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["project", "id"])
        .returning(Dataset.id)
    )
    row = session.scalars(
        select(Dataset)
        .where(Dataset.project == project, Dataset.id == ds_id)
        .execution_options(populate_existing=True)
    ).one()
    return row, inserted is not None


def get_dataset(session: Session, dataset_id: str, *, project: str | None = None) -> Dataset | None:
    """The dataset visible to `project` (None = admin: any project's copy), or None."""
    stmt = select(Dataset).where(Dataset.id == dataset_id)
    if project is not None:
        stmt = stmt.where(Dataset.project == project)
    return session.scalars(stmt.order_by(Dataset.created_at).limit(1)).first()


def list_datasets(session: Session, *, project: str | None = None, limit: int = 100) -> list[Dataset]:
    """Datasets, newest first."""
    stmt = select(Dataset)
    if project is not None:
        stmt = stmt.where(Dataset.project == project)
    return list(session.scalars(stmt.order_by(Dataset.created_at.desc(), Dataset.id).limit(limit)))
