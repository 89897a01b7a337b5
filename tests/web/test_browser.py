"""The web client in a real browser (Debian's Chromium, driven by Playwright): sign up, converse live, come
back later and find the conversation."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import SettingsFactory
from tests.support.live import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags a sandboxed, offline machine needs: no sandbox as root, no background calls to Google.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("PARLEY_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("Chromium is required (apt-get install -y chromium)")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def server(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    live = LiveServer(make_settings(builtin_token_delay_s=0.01)).start()
    yield live
    live.stop()


def sign_up(page: Page, url: str, email: str) -> None:
    page.goto(url)
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", "correct horse battery")
    page.click("button[value=register]")
    expect(page.locator("#status")).to_have_text("live", timeout=10_000)


def test_sign_up_converse_and_find_it_again(browser: Browser, server: LiveServer) -> None:
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    sign_up(page, server.url, "browser@example.com")
    page.fill("#composer textarea", "what is 12 * 7?")
    page.click("#send")
    expect(page.locator("#messages li.user")).to_have_text(["what is 12 * 7?"])
    expect(page.locator("#messages li.step").first).to_be_visible()
    expect(page.locator("#messages li.assistant")).to_contain_text(["84"], timeout=10_000)
    expect(page.locator("#threads li")).to_have_text(["what is 12 * 7?"])

    # Later, in a new tab of the same browser: still signed in, and the conversation is all there.
    later = context.new_page()
    later.goto(server.url)
    expect(later.locator("#status")).to_have_text("live", timeout=10_000)
    later.click("#threads li")
    expect(later.locator("#messages li.user")).to_have_text(["what is 12 * 7?"])
    expect(later.locator("#messages li.assistant")).to_contain_text(["84"])
    assert problems == []
    context.close()


def test_the_page_is_served_with_a_strict_content_security_policy(browser: Browser, server: LiveServer) -> None:
    page = browser.new_page()
    response = page.goto(server.url)
    assert response is not None and response.status == 200
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-frame-options"] == "DENY"
    page.close()
