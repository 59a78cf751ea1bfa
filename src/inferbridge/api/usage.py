"""`GET /v1/usage`: requests and tokens per key and model, today and yesterday (UTC).

Admin keys only (`auth.admin_keys`); any other key gets a 403. The counts come from the
state store, so with `state: {store: redis}` they are the totals of every replica.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from inferbridge.errors import InferbridgeError
from inferbridge.keys import IDENTITY, Identity

router = APIRouter(tags=["admin"])


class PermissionDenied(InferbridgeError):
    status = 403
    type = "invalid_request_error"
    code = "insufficient_permissions"


def identity_of(request: Request) -> Identity | None:
    return request.scope.get("state", {}).get(IDENTITY)


@router.get("/v1/usage", summary="Usage per key and model (admin keys only)")
async def usage(request: Request) -> Response:
    """Today's and yesterday's (UTC) requests and tokens per key and model:
    `{"object": "usage", "days": [{"date", "usage": [{"key", "model", "requests",
    "prompt_tokens", "completion_tokens", "total_tokens"}]}]}`, today first."""
    identity = identity_of(request)
    if identity is None or not identity.admin:
        raise PermissionDenied(
            "GET /v1/usage needs an admin key (auth.admin_keys).", code="insufficient_permissions"
        )
    report = await request.app.state.gateway.quotas.usage()
    return Response(orjson.dumps(report), media_type="application/json")
