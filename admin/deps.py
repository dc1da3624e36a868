"""What the admin API's routes share: the fleet, its actions and the store (`Ctx`, on the
app), the role a route needs (`require`), and the errors every route may answer with."""

from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

from fleetwise.fleet import FleetActions

from .auth import Principal, Role
from .schemas import Problem
from .store import Store
from .view import FleetView

bearer = HTTPBearer(auto_error=False, description="A token from the admin API's tokens file; its role decides "
                                                  "what it may do (viewer, operator, admin).")


@dataclass
class Ctx:
    store: Store
    view: FleetView
    actions: FleetActions


def context(request: Request) -> Ctx:
    return request.app.state.ctx


CTX = Depends(context)


def require(role: Role) -> Any:
    """A dependency: the caller's principal, 401 without a valid token, 403 below `role`."""
    def check(request: Request, _: Any = Depends(bearer)) -> Principal:
        principal: Principal | None = request.state.principal
        if principal is None:
            raise HTTPException(401, request.state.auth_error, headers={"WWW-Authenticate": "Bearer"})
        if principal.role < role:
            raise HTTPException(403, f"{principal.name} is a {principal.role.label}; this needs the "
                                     f"{role.label} role or above")
        return principal
    return Depends(check)


def note(request: Request, detail: str) -> None:
    """What the audit log says this request did."""
    request.scope.setdefault("state", {})["audit_detail"] = detail


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {400: "The body is not JSON, or a parameter is malformed (the detail names it).",
                 401: "No bearer token, or not a valid one.", 403: "The token's role may not do this.",
                 404: "No such worker, incident or record.", 409: "The fleet refused the action (the detail says why).",
                 413: "The body is over the limit.", 422: "The body or a parameter is invalid (each one in errors).",
                 429: "Over the request rate for this token; see Retry-After.", 500: "The service failed."}
    return {c: {"model": Problem, "description": described[c]} for c in (400, 401, 403, 413, 422, 429, 500, *codes)}
