"""Every error of the admin API in one JSON shape: RFC 9457 problem details
(`application/problem+json`: type, title, status, detail, instance), FastAPI's validation
errors included (422, each bad field in `errors`, the first named in `detail`). The detail
is also what the audit log records for a refused mutation."""

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(status: int, detail: str, instance: str, headers: dict[str, str] | None = None,
            errors: list[dict] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": http.HTTPStatus(status).phrase, "status": status,
                            "detail": detail, "instance": instance}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status, headers=headers, media_type=PROBLEM)


def _note(request: Request, detail: str) -> None:
    request.scope.setdefault("state", {})["audit_detail"] = detail


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's words
        detail = "body: not a JSON document"
    _note(request, detail)
    return problem(exc.status_code, detail, request.url.path, dict(exc.headers or {}))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5]) or "invalid request"
    _note(request, detail)
    return problem(422, detail, request.url.path, errors=errors)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return problem(500, f"internal error ({type(exc).__name__}); see the admin service's log", request.url.path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
