"""The dashboard's checks: who may change state, from where, with how big a request.

Runs in: the dashboard. The rules:

- Reading needs nothing (bind to loopback, the default, to keep it private). A page is
  only served to a Host that names the address it listens on, or a loopback name when it
  listens on loopback: a DNS-rebinding page on another site cannot read it.
- Changing state (requeue, purge, cancel, rerun, scale, signal) is POST only, and needs
  the token the dashboard was started with (--web-token): in the X-Handoff-Token header, a
  `token` form field, or the session cookie /unlock sets (an HMAC of the token, never the
  token; HttpOnly, SameSite=Strict). Without a token the dashboard is read-only. Tokens
  are compared in constant time (hmac.compare_digest).
- A POST must be same-origin: a browser says where it comes from (Sec-Fetch-Site,
  Origin, Referer) and a cross-site one is refused; a client that sends none of them
  (curl, a script) is not a browser a page could have tricked.
- Requests are small: a URL of at most MAX_URL_BYTES, a body of at most MAX_BODY_BYTES.
- Every answer carries headers that keep it from being framed, sniffed or made to run
  a script it did not ship (Content-Security-Policy: scripts and styles from itself only).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_URL_BYTES = 2048
MAX_BODY_BYTES = 16 * 1024
MAX_FORM_FIELDS = 1100  # a purge of the 1,000 oldest dead letters, by id, and a few more
TOKEN_HEADER = "x-handoff-token"
COOKIE = "handoff_session"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]  # fmt: skip


def session_value(token: str) -> str:
    """What the session cookie holds: derived from the token, so the cookie never
    carries the token itself (a leaked cookie does not give the token away)."""
    return hmac.new(token.encode(), b"handoff dashboard session", hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """Host header names served: loopback names when bound to loopback, the bound
    address itself otherwise; None (any) when bound to every interface."""
    host = bind_host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return LOOPBACK_NAMES
    except ValueError:  # a name, not an address
        if host == "localhost":
            return LOOPBACK_NAMES
    return frozenset({bind_host, host, *LOOPBACK_NAMES})


def host_name(host_header: str) -> str:
    """'127.0.0.1:8321' -> '127.0.0.1'; '[::1]:8321' -> '[::1]'."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """Request checks shared by the routes; `token` None means read-only."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None
        self._session = session_value(token) if token else None

    @property
    def read_only(self) -> bool:
        return self.token is None

    def unlocked(self, request: Request) -> bool:
        """Whether this browser holds the session cookie (for what the page shows)."""
        cookie = request.cookies.get(COOKIE, "")
        return bool(self._session and cookie and same(cookie, self._session))

    def check_origin(self, request: Request) -> None:
        """403 unless the request comes from this dashboard's own pages (or no browser)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise HTTPException(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        origin = request.headers.get("origin")
        if origin is not None:
            if origin != own:
                raise HTTPException(403, "cross-origin request refused (Origin does not match)")
            return
        referer = request.headers.get("referer")
        if referer is not None and referer != own and not referer.startswith(own + "/"):
            raise HTTPException(403, "cross-origin request refused (Referer does not match)")

    def check_action(self, request: Request, form: dict[str, list[str]]) -> None:
        """403 unless the dashboard has a token and the request carries it."""
        self.check_origin(request)
        if self.token is None:
            raise HTTPException(
                403, "read-only dashboard: start it with --web-token to allow actions"
            )
        given = request.headers.get(TOKEN_HEADER) or first(form, "token")
        if given:
            if not same(given, self.token):
                raise HTTPException(403, "wrong token")
            return
        cookie = request.cookies.get(COOKIE)
        if cookie and self._session and same(cookie, self._session):
            return
        raise HTTPException(403, "this action needs the dashboard's token: unlock first")


async def read_form(request: Request) -> dict[str, list[str]]:
    """The urlencoded body, at most MAX_BODY_BYTES and MAX_FORM_FIELDS (413 / 400)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
    if not body:
        return {}
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form urlencoded (application/x-www-form-urlencoded)")
    try:
        pairs = parse_qsl(
            body.decode(), keep_blank_values=True, strict_parsing=True,
            max_num_fields=MAX_FORM_FIELDS,
        )  # fmt: skip
    except (UnicodeDecodeError, ValueError) as e:
        raise HTTPException(400, f"malformed form: {str(e)[:100]}") from None
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


def first(form: dict[str, list[str]], name: str, default: str = "") -> str:
    values = form.get(name)
    return values[0] if values else default


class LimitsMiddleware:
    """Refuses a foreign Host (400), a long URL (414), a declared oversized body (413);
    adds the security headers to every answer. Plain ASGI: it wraps the streams too."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self._problem(scope, headers)
        if problem is not None:
            status, text = problem
            await plain_error(send, status, text)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                names = {name for name, _ in message["headers"]}
                message["headers"] += [h for h in SECURITY_HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_secured)

    def _problem(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        if self.hosts is not None and host_name(headers.get("host", "")) not in self.hosts:
            return 400, "unexpected Host header: open the dashboard at the address it serves"
        if len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > MAX_URL_BYTES:
            return 414, f"URL over {MAX_URL_BYTES} bytes"
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return 400, "malformed Content-Length"
        if int(length) > MAX_BODY_BYTES:
            return 413, f"request body over {MAX_BODY_BYTES} bytes"
        return None


async def plain_error(send: Send, status: int, text: str) -> None:
    body = f"{status}: {text}\n".encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
