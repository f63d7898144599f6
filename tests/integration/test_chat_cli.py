"""`peerd chat` through a pseudo-terminal (pexpect), against a real in-process swarm."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pexpect

from tests.helpers.swarm import MODEL_ID

PROMPT = "you> "
# a reply: what follows "bot> " up to the stats line peerd chat writes to stderr after it
REPLY = re.compile(rb"bot> (.*?)\r\n\[(\d+) tokens", re.DOTALL)


def _talk(argv: list[str], turns: list[str]) -> tuple[list[str], int]:
    """Run ``peerd chat`` in a pty, say each of ``turns``; returns the replies and the exit status."""
    child = pexpect.spawn(
        sys.executable, ["-m", "peerd", "chat", *argv], timeout=90, env={**os.environ, "TERM": "dumb"}
    )
    replies = []
    try:
        child.expect_exact(PROMPT)
        for turn in turns:
            child.sendline(turn)
            if turn.startswith("/"):
                if turn == "/exit":
                    child.expect(pexpect.EOF)
                    break
                child.expect_exact("(new conversation)")
            else:
                child.expect(REPLY)
                replies.append(child.match.group(1).decode().replace("\r\n", "\n"))
            child.expect_exact(PROMPT)
    finally:
        child.close(force=True)
    return replies, child.exitstatus


async def test_chat_keeps_history_resets_and_exits(make_swarm) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        first = (await client.chat([{"role": "user", "content": "hello"}], max_new_tokens=6)).text
        history = [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "and then?"},
        ]
        second = (await client.chat(history, max_new_tokens=6)).text
        alone = (await client.chat([{"role": "user", "content": "and then?"}], max_new_tokens=6)).text
    finally:
        await client.close()
    assert second != alone  # so the second turn below shows the history was sent

    argv = ["--model", str(swarm.ckpt), "--model-id", MODEL_ID, "--initial-peers", ",".join(swarm.initial_peers)]
    argv += ["--max-new-tokens", "6"]
    turns = ["hello", "and then?", "/reset", "and then?", "/exit"]
    replies, status = await asyncio.to_thread(_talk, argv, turns)
    assert replies == [first, second, alone]
    assert status == 0
