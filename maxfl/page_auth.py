"""A bearer token in front of the web pages people open (the anchor's federation page, a plant's page).

The pages listen on loopback by default, but a loopback port is open to every user and process of the host, and
the pages show privacy budgets, audit trails and the federation's members. So every protected path needs the
page's token, sent the way a person or a scraper can: `Authorization: Bearer TOKEN` (Prometheus' `authorization`
scrape option, curl), or once as `?token=TOKEN` in the URL the server printed, which sets an HttpOnly cookie and
redirects to the same page without it (Jupyter's way), so the token does not stay in the address bar or history.
Browsers keep cookies per host, not per port: the cookie's name carries a digest of the token, so the anchor's page
and a plant's page on one host (a local federation) each keep their own.

The token lives in a file only its owner can read, made once (`load_or_create_token`); rotating it is deleting
the file and restarting the server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Sequence
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from maxfl.atomic import atomic_write_text
from maxfl.errors import ConfigError

COOKIE_PREFIX = "maxfl_page_"
TOKEN_BYTES = 32

Scope = dict
Receive = Callable
Send = Callable


def cookie_name(token: str) -> str:
    """The cookie that carries `token`: one per page (token), so pages on one host do not overwrite each other's."""
    return COOKIE_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:12]


def load_or_create_token(path: Path) -> str:
    """The token in `path`, made (owner-only) if the file does not exist yet."""
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise ConfigError(f"the page token in {path} is shorter than 16 characters: delete the file to have a new one made")
        return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    previous = os.umask(0o077)
    try:
        atomic_write_text(path, token + "\n")
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    return token


class TokenAuth:
    """ASGI middleware: requests to `protected` path prefixes need the token; everything else passes untouched.

    `hint` ends the 401's one line: where the token is (e.g. "the token is in /srv/anchor/page-token").
    """

    def __init__(self, app: Callable, token: str, protected: Sequence[str] = ("/",), hint: str = "") -> None:
        if not token:
            raise ConfigError("a page needs a non-empty token")
        self.app, self.token, self.protected, self.hint = app, token, tuple(protected), hint
        self.cookie = cookie_name(token)

    def _protects(self, path: str) -> bool:
        prefixes = [p.rstrip("/") for p in self.protected]
        return any(not p or path == p or path.startswith(p + "/") for p in prefixes)

    def _matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed Cookie header is no token, not a 500
            cookie = SimpleCookie()
        from_cookie = cookie[self.cookie].value if self.cookie in cookie else None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        from_query = next((v for k, v in query if k == "token"), None)
        if self._matches(bearer) or self._matches(from_cookie):
            await self.app(scope, receive, send)
            return
        if self._matches(from_query) and scope["method"] in ("GET", "HEAD"):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = scope["path"] + (f"?{rest}" if rest else "")
            await _respond(send, 303, "see the page without the token in its address\n", [
                (b"location", location.encode("latin-1")),
                (b"set-cookie", f"{self.cookie}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")),
            ])
            return
        what = "a wrong token" if bearer or from_cookie or from_query else "no token"
        hint = f"; {self.hint}" if self.hint else ""
        await _respond(send, 401, f"this page needs its token ({what} was sent): open the URL the server printed, "
                                  f"or send 'Authorization: Bearer TOKEN'{hint}\n", [(b"www-authenticate", b'Bearer realm="maxfl"')])


async def _respond(send: Send, status: int, body: str, headers: list[tuple[bytes, bytes]]) -> None:
    data = body.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode()), (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": data})
