"""The request body limit (BERTQ_HTTP_MAX_BODY_BYTES), enforced before the app reads a byte of it: a
declared Content-Length over the limit is answered 413 at once, and a body sent without one is
counted as it arrives and answered 413 the moment it passes the limit. Nothing is queued either way."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bertq.gateway.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the body is over the limit of {self.max_bytes} bytes (BERTQ_HTTP_MAX_BODY_BYTES)"
        await error_response(413, "body_too_large", message, "body")(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, as one message; then the client's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
