"""The pages' bearer token: header, cookie, or once in the URL; everything else is a 401 with one line."""

from __future__ import annotations

import stat

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from maxfl.errors import ConfigError
from maxfl.page_auth import TokenAuth, cookie_name, load_or_create_token

TOKEN = "t" * 43
COOKIE = cookie_name(TOKEN)


def _client(protected=("/plant",)) -> TestClient:
    async def hello(request):
        return PlainTextResponse(f"hello {request.url.path}")

    app = Starlette(routes=[Route("/plant", hello), Route("/plant/ledger", hello), Route("/predict", hello), Route("/plantx", hello)])
    return TestClient(TokenAuth(app, TOKEN, protected, hint="the token is in /x/page-token"), follow_redirects=False)


def test_a_protected_page_without_its_token_is_401_with_one_line_saying_how():
    r = _client().get("/plant")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.text.count("\n") == 1 and "no token" in r.text and "/x/page-token" in r.text
    assert _client().get("/plant/ledger", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert "wrong token" in _client().get("/plant", cookies={COOKIE: "nope"}).text


def test_the_bearer_header_and_the_cookie_open_it():
    assert _client().get("/plant/ledger", headers={"Authorization": f"Bearer {TOKEN}"}).text == "hello /plant/ledger"
    client = _client()
    client.cookies.set(COOKIE, TOKEN)
    assert client.get("/plant").status_code == 200


def test_the_token_in_the_url_sets_a_cookie_and_leaves_the_address_bar():
    client = _client()
    r = client.get("/plant", params={"token": TOKEN, "run": "3"})
    assert r.status_code == 303 and r.headers["location"] == "/plant?run=3"
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
    assert client.get("/plant?run=3").text == "hello /plant"  # the cookie it set
    assert _client().post("/plant", params={"token": TOKEN}).status_code == 401  # a link can open a page, never change anything


def test_paths_outside_the_protected_prefixes_pass_untouched():
    client = _client()
    assert client.get("/predict").status_code == 200 and client.get("/plantx").status_code == 200
    assert _client(protected=("/",)).get("/predict").status_code == 401


def test_the_token_file_is_made_once_and_owner_only(tmp_path):
    path = tmp_path / "state" / "page-token"
    token = load_or_create_token(path)
    assert len(token) >= 40 and load_or_create_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="delete the file"):
        load_or_create_token(path)


def test_two_pages_on_one_host_keep_their_own_cookies():
    """Browsers keep cookies per host, not per port: the anchor's page and a plant's page must not overwrite each other's."""
    assert cookie_name("a" * 43) != cookie_name("b" * 43) and cookie_name(TOKEN) == COOKIE
    client = _client()
    client.cookies.set(cookie_name("another page's token" * 3), "whatever")
    client.cookies.set(COOKIE, TOKEN)
    assert client.get("/plant").status_code == 200
