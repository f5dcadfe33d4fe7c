"""Webhook route: the caller's project signing secret (deliveries themselves are sent by the dispatcher)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import PrincipalDep, SettingsDep
from core.schemas import WebhookSecretOut
from core.webhooks import project_secret

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get(
    "/webhooks/secret", response_model=WebhookSecretOut, summary="The project's webhook signing secret"
)
def webhook_secret(settings: SettingsDep, principal: PrincipalDep) -> WebhookSecretOut:
    """Verify deliveries with any Standard Webhooks library using this secret; it is the same for every job of the project."""
    project = principal.owner
    return WebhookSecretOut(project=project, secret=project_secret(settings.webhook_master_secret(), project))
