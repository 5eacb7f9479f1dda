"""Every error the server answers, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

A request's own fault is a 4xx naming the field; the server's storage failing (a full or read-only disk, SQLite
refusing a write) is a 503 ``storage_error``; anything else unforeseen is a 500 ``internal_error``. No message says
where the server keeps its files (``faults.Scrubber``), and no client sees a traceback: the log has it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request

from cinematic.serve.faults import describe
from cinematic.serve.schemas import ErrorResponse
from cinematic.serve.store import StoreError

log = logging.getLogger("cinematic.serve")
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}
# Errors that Starlette or FastAPI raise themselves, by status, given a code as ours have.
HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
KEY_REQUIRED = "a valid API key is required: send the header Authorization: Bearer <key>"
_DESCRIPTIONS = {
    401: "The API key is missing or wrong (only when the server has one).",
    404: "No such video (or it was deleted).",
    409: "The video is not in a state that allows this.",
    413: "The request body is over this server's --max-body.",
    422: "A field is invalid; `error.param` names it.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    503: "The server could not read or write its storage (a full or read-only disk); nothing was changed.",
}


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with this status."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(message: str, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of these error statuses."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def add_error_handlers(app: FastAPI, scrub: Callable[[str], str]) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        body = error_body(scrub(error.message), error.status, error.code, error.param)
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_problem(e) for e in error.errors()]
        message = "; ".join(f"{field}: {text}" if field else text for field, text in problems)
        param = next((field for field, _ in problems if field), None)
        return JSONResponse(error_body(message, 422, "invalid_value", param), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400 and error.__cause__ is not None:  # FastAPI could not parse the JSON body
            cause = error.__cause__
            reason = "it is not UTF-8" if isinstance(cause, UnicodeDecodeError) else type(cause).__name__
            return JSONResponse(error_body(f"the request body is not valid JSON: {reason}", 422, "invalid_value"), 422)
        code = HTTP_CODES.get(error.status_code, "http_error")
        body = error_body(str(error.detail), error.status_code, code)
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    async def storage(request: Request, error: Exception) -> JSONResponse:
        log.warning("%s %s: storage fault: %s", request.method, request.url.path, describe(error))
        message = scrub(f"the server could not read or write its storage ({describe(error)}); try again later")
        return JSONResponse(error_body(message, 503, "storage_error"), status_code=503)

    app.add_exception_handler(OSError, storage)
    app.add_exception_handler(sqlite3.Error, storage)
    app.add_exception_handler(StoreError, storage)  # a shared database that is down

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:  # Starlette logs the traceback
        body = error_body("the server failed to handle this request; the error is in its log", 500, "internal_error")
        return JSONResponse(body, status_code=500)


def _problem(error: dict[str, Any]) -> tuple[str | None, str]:
    """(field, message) of one pydantic error, in words a client can act on."""
    where: Sequence[Any] = error.get("loc", ())
    field = ".".join(str(part) for part in where[1:]) or None
    kind, text = error.get("type"), str(error.get("msg", "is invalid"))
    if kind == "json_invalid":
        return None, "the request body is not valid JSON"
    if kind == "missing":
        return field, "is required" if field else "a JSON body is required"
    if kind == "extra_forbidden":
        return field, "is not a field of this request"
    return field, text.removeprefix("Value error, ")
