"""What every request passes before the application reads a byte of its body: the API key, then the body's size.

A pure ASGI middleware, outside FastAPI, because FastAPI reads and parses the whole body before any dependency
runs: a request without the key would otherwise cost its body's size (three times over, as bytes, text and JSON)
before its 401, and a malformed one would get a 422 instead. So the key is checked first, on the headers alone (a
request without it gets 401 whatever its body), then ``Content-Length`` against the limit, then the bytes as they
arrive (a chunked body has no length): over the limit is a 413 at once, and the rest is not read.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cinematic.serve.errors import KEY_REQUIRED, error_body


class _TooLarge(Exception):
    pass


def authorized(header: str | None, key: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    credentials = given.strip().encode() if scheme.lower() == "bearer" else b""
    return hmac.compare_digest(credentials, key)  # constant time: the comparison leaks nothing about the key


def needs_key(path: str) -> bool:
    """The API and the metrics; the page, its files, the schema and /healthz stay open."""
    return path == "/metrics" or path == "/v1" or path.startswith("/v1/")


class Gate:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.key is not None and needs_key(scope["path"]) and not authorized(headers.get("authorization"), self.key):
            await _answer(send, 401, KEY_REQUIRED, "invalid_api_key", {"www-authenticate": "Bearer"})
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _answer(send, 413, self._too_large(), "body_too_large", {"connection": "close"})
            return
        await self._counting(scope, receive, send)

    async def _counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with the body counted as it is read; past the limit, answer 413 and drop the app's answer."""
        received, started, answered = 0, False, False

        async def counted() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    if not started and not answered:
                        answered = True
                        await _answer(send, 413, self._too_large(), "body_too_large", {"connection": "close"})
                    raise _TooLarge
            return message

        async def forward(message: Message) -> None:
            nonlocal started
            if answered:  # the app's answer to the error it saw while reading: the client has its 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, forward)
        except _TooLarge:
            if not answered:
                raise

    def _too_large(self) -> str:
        return f"the request body is over this server's limit of {self.max_body} bytes (--max-body)"


async def _answer(send: Send, status: int, message: str, code: str, headers: dict[str, str]) -> None:
    body = json.dumps(error_body(message, status, code)).encode()
    fields: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode(), value.encode()) for name, value in headers.items()),
    ]
    start: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": fields}
    await send(start)
    await send({"type": "http.response.body", "body": body})
