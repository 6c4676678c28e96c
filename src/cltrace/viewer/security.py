"""Who may talk to the server: the Host, Origin and token checks, body size limits, and safe response headers.

A page on another site can make the browser send requests to 127.0.0.1 (CSRF), and a domain whose DNS
answer changes to 127.0.0.1 can even read the responses (DNS rebinding). So:
  * Host must name this server (127.0.0.1 / localhost / [::1], or the address given with --host), else 403:
    a rebinding page's requests carry its own domain in Host;
  * a request that changes state or runs the model must carry the per-server token (X-Cltrace-Token), which
    only pages served by this server know (it is written into index.html, which other origins cannot read),
    and an Origin header, when present, must be this server's;
  * bodies over `max_body` bytes are refused with 413: by Content-Length before they are read, and a body
    sent without one (chunked) is cut off at the limit while it is read (app.body).
Every response gets a Content-Security-Policy that allows only this server's own scripts and styles (no inline
script, no external loads), so text that slipped into the page unescaped still could not run.
"""

from __future__ import annotations

import hmac
import json
import secrets

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
           (b"cross-origin-resource-policy", b"same-origin")]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def host_names(bind_host: str) -> set[str]:
    names = {"127.0.0.1", "localhost", "[::1]", "::1"}
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(bind_host if ":" not in bind_host or bind_host.startswith("[") else f"[{bind_host}]")
    return names


def split_host(value: str) -> str:
    """'127.0.0.1:8765' -> '127.0.0.1', '[::1]:80' -> '[::1]'."""
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware applying the checks above to every HTTP request."""

    def __init__(self, app, *, token: str, hosts: set[str], max_body: int = 1 << 20):
        self.app, self.token, self.hosts, self.max_body = app, token, hosts, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = split_host(headers.get("host", "")).lower()
        if host not in self.hosts:
            return await _deny(send, 403, f"Host {host!r} is not this server (DNS rebinding guard): open the URL "
                                          "that `cltrace serve` printed")
        method = scope["method"]
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and split_host(origin.split("://", 1)[-1]).lower() not in self.hosts:
                return await _deny(send, 403, f"requests from {origin} are not accepted (cross-site guard)")
            if not hmac.compare_digest(headers.get("x-cltrace-token", ""), self.token):
                return await _deny(send, 403, "missing or wrong X-Cltrace-Token: reload the page the server sent")
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                return await _deny(send, 400, "bad Content-Length")
            if length > self.max_body:
                return await _deny(send, 413, f"request body of {length} bytes is over the {self.max_body}-byte limit")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + HEADERS}
            await send(message)

        scope.setdefault("state", {})["max_body"] = self.max_body  # bodies without a length: app.body()
        await self.app(scope, receive, send_with_headers)


async def _deny(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + HEADERS})
    await send({"type": "http.response.body", "body": body})
