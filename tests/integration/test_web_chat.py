"""The web chat of `peerd api` in headless Chromium: type a question, watch the answer stream in."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from peerd.api import ApiSettings, build_app
from peerd.web.server import AsgiServer
from tests.helpers.browser import Browser
from tests.helpers.observability import CHROMIUM
from tests.helpers.swarm import MODEL_ID, Swarm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium (.ci/run installs it)"),
]

TOKENS = 8
ANSWER = "document.querySelector('.turn.assistant')"


def _chat_in_browser(url: str, profile: Path) -> tuple[list[str], dict[str, str]]:
    """Type a question; return the answer texts seen while it streamed, and the final page state."""
    browser = Browser(profile)
    try:
        browser.open(url)
        deadline = time.monotonic() + 30
        loaded = "(document.getElementById('model') || {textContent: ''}).textContent.startsWith('model ')"
        while not browser.eval(loaded):  # the page has loaded and fetched /v1/models
            assert time.monotonic() < deadline, "the page never loaded the model list"
            time.sleep(0.05)
        browser.eval("document.getElementById('question').focus()")
        browser.type("Why is the sky blue?")
        browser.press_enter()
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not browser.eval(f"{ANSWER} !== null && {ANSWER}.dataset.done === '1'"):
            assert time.monotonic() < deadline, "no complete answer in 60 s"
            if browser.eval(f"{ANSWER} !== null && {ANSWER}.classList.contains('streaming')"):
                seen.append(browser.eval(f"{ANSWER}.textContent"))
            time.sleep(0.02)
        state = browser.eval(
            "({question: document.querySelector('.turn.user').textContent,"
            f" answer: {ANSWER}.firstChild ? {ANSWER}.firstChild.textContent : '',"
            f" route: ({ANSWER}.querySelector('.route') || {{}}).textContent || '',"
            " stats: document.getElementById('stats').textContent,"
            " error: document.getElementById('error').textContent})"
        )
        return seen, state
    finally:
        browser.close()


async def test_web_chat_streams_an_answer(make_swarm, tmp_path: Path) -> None:
    # each step takes 3 x 0.05 s at the peers, so the page is seen mid-answer whatever the machine's speed
    swarm: Swarm = await make_swarm(step_delay_s=0.05)
    client = await swarm.client()
    server = AsgiServer(build_app(client, ApiSettings(model_names=frozenset({MODEL_ID}), max_context_tokens=256)))
    try:
        port = await server.start("127.0.0.1", 0)
        want = await client.chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=TOKENS)
        url = f"http://127.0.0.1:{port}/?max_tokens={TOKENS}"
        seen, state = await asyncio.to_thread(_chat_in_browser, url, tmp_path / "profile")
    finally:
        await server.close()
        await client.close()
    assert state["error"] == ""
    assert state["question"] == "Why is the sky blue?"
    assert state["answer"] == want.text
    partial = [text for text in seen if 0 < len(text) < len(want.text)]
    assert partial, f"never saw a partial answer: {seen}"
    assert state["route"].startswith("route: ") and state["route"].count("→") == 2
    assert "tokens/s" in state["stats"]
