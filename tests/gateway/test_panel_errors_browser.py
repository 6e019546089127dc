"""Errors as a browser shows them (Debian's Chromium, headless, driven by Playwright), against the
appliance's web app served by uvicorn on 127.0.0.1 in a thread (no lab, no root): an unknown
connection's page is the panel's 404 page; a viewer's failover from the panel gets the panel's
403 message (the API's ``detail``), never a JSON document."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from appliance.config import parse
from webui.auth import hash_password

from .test_tls import served

ADMIN = "admin-token-123456"
PASSWORD = "correct horse battery"


def config() -> dict:
    return {
        "api": {"token": ADMIN,
                "user": [{"name": "vera", "role": "viewer", "password_hash": hash_password(PASSWORD, n=1024)}]},
        "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                     "backend": [{"name": "primary", "address": "198.51.100.10"},
                                 {"name": "backup", "address": "198.51.100.20"}]}],
    }


@pytest.fixture(scope="module")
def panel() -> Iterator[str]:
    with served(parse(config())) as (addr, gw):
        yield f"http://{addr}"


def sign_in(browser: Any, panel: str, **form: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(f"{panel}/login")
    for name, value in form.items():
        page.fill(f"input[name={name}]", value)
    page.click("button[type=submit]")
    page.wait_for_url(f"{panel}/")
    return page


def assert_error_page(page: Any, status: int, message: str) -> None:
    assert page.locator("#error-code").inner_text() == str(status)
    assert message in page.locator("#error p.error").first.inner_text()
    assert page.locator("a#back").count() == 1
    text = page.locator("body").inner_text()
    assert not text.lstrip().startswith("{") and '"detail"' not in text


def test_an_unknown_connection_is_the_panels_404_page(browser: Any, panel: str) -> None:
    page = sign_in(browser, panel, token=ADMIN)
    r = page.goto(f"{panel}/connections/424242")
    assert r is not None and r.status == 404 and r.headers["content-type"].startswith("text/html")
    assert_error_page(page, 404, "no connection with id 424242")
    assert page.locator("header nav").count() == 1 and page.locator("#banner").count() == 1  # the panel's layout
    page.click("a#back")
    page.wait_for_url(f"{panel}/connections")
    assert page.locator("table#connections").count() == 1
    # the API's URL typed into the address bar: a page too, not the API's JSON
    r = page.goto(f"{panel}/api/v1/connections/424242")
    assert r is not None and r.status == 404
    assert_error_page(page, 404, "424242")
    page.context.close()


def test_a_viewers_failover_shows_the_panels_403_message(browser: Any, panel: str) -> None:
    page = sign_in(browser, panel, username="vera", password=PASSWORD)
    page.goto(f"{panel}/services")
    # a viewer's page has no action buttons; put the operator's failover button in it, as a page
    # kept open from an operator's session (or one edited in the browser's tools) would have it
    assert page.locator("button.act[data-action=failover]").count() == 0
    page.evaluate("""() => {
        const b = document.createElement('button');
        b.className = 'act'; b.dataset.action = 'failover'; b.dataset.service = 'web'; b.textContent = 'Fail over web';
        document.querySelector('main').prepend(b);
    }""")
    page.click("button.act[data-action=failover]")
    page.locator("#confirm-text").filter(has_text="Moves 0 connections from primary to backup").wait_for()
    page.click("#confirm-ok")                                   # reading the impact is a viewer's right; acting is not
    toast = page.locator("#toast.show.bad")
    toast.wait_for(timeout=10000)
    text = toast.inner_text()
    assert text == "Refused (403): vera has role viewer; this needs operator", text
    assert page.url == f"{panel}/services"                      # still the panel's page, no JSON document
    # and a viewer's form post of the action (the browser navigates): the panel's 403 page
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    page.set_content(f'<form method="post" action="{panel}/api/v1/services/web/failover">'
                     f'<input name="csrf_token" value="{csrf}"><button id="go">go</button></form>')
    with page.expect_navigation():
        page.click("#go")
    assert_error_page(page, 403, "vera has role viewer; this needs operator")
    page.context.close()
