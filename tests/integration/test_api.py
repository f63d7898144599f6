"""`peerd api` against a real in-process swarm, driven by the official `openai` client and curl."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
import pytest

from peerd.api import ApiSettings, build_app
from peerd.cli.main import main
from peerd.client import SamplingParams, SwarmClient
from peerd.web.server import AsgiServer
from tests.helpers.swarm import MODEL_ID, Swarm, crash

CONTEXT = 96  # small, so "too long" is cheap to build
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


def _http(url: str, data: bytes | None = None) -> tuple[int, str]:
    """(status, body) of a plain GET (or POST of ``data``), whatever the status."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Served:
    swarm: Swarm
    client: SwarmClient
    server: AsgiServer
    url: str
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def openai(self, **kwargs) -> openai.AsyncOpenAI:
        options = {"api_key": "unused", "max_retries": 0, "timeout": 60.0, **kwargs}
        self.clients.append(openai.AsyncOpenAI(base_url=f"{self.url}/v1", **options))
        return self.clients[-1]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.server.close()
        await self.client.close()


async def _serve(swarm: Swarm, **settings: object) -> Served:
    client = await swarm.client(failover_timeout_s=3.0)
    base = {"model_names": frozenset({MODEL_ID}), "max_context_tokens": CONTEXT, "default_max_tokens": 16}
    server = AsgiServer(build_app(client, ApiSettings(**{**base, **settings})))  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    return Served(swarm, client, server, f"http://127.0.0.1:{port}")


@pytest.fixture
async def served(make_swarm) -> AsyncIterator[Served]:
    swarm = await make_swarm()
    api = await _serve(swarm)
    yield api
    await api.close()


async def test_chat_whole_and_streamed_equal_peerd_generate(served: Served, capsys) -> None:
    oa = served.openai()
    models = await oa.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]

    whole = await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage is not None and whole.usage.completion_tokens <= 12
    assert whole.usage.prompt_tokens == len(served.client.chat_ids(QUESTION))

    pieces, usage = [], None
    stream = await oa.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == text and text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens

    # `peerd generate` with the same settings (its own event loop, in a thread) prints the same text
    argv = ["generate", "--model", str(served.swarm.ckpt), "--model-id", MODEL_ID, "--max-new-tokens", "12"]
    argv += ["--initial-peers", ",".join(served.swarm.initial_peers), QUESTION[0]["content"]]
    capsys.readouterr()
    assert await asyncio.to_thread(main, argv) == 0
    assert capsys.readouterr().out == text + "\n"


async def test_seeded_sampling_and_stop_strings_through_the_api(served: Served) -> None:
    oa = served.openai()
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 10}
    extra = {"top_k": 40, "repetition_penalty": 1.2}
    runs = [
        (await oa.completions.create(model=MODEL_ID, prompt="abc", extra_body=extra, **params)).choices[0].text
        for _ in range(2)
    ]
    assert runs[0] == runs[1]  # seeded: reproducible
    sdk = await served.client.generate(
        "abc", max_new_tokens=10, sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=11, top_k=40,
                                                          repetition_penalty=1.2),
    )  # fmt: skip
    assert runs[0] == sdk.text
    # a stop string taken from the middle of that text ends the reply right before it
    stop = sdk.text[3:5]
    assert len(stop) == 2
    cut = await oa.completions.create(model=MODEL_ID, prompt="abc", stop=[stop], **params, extra_body=extra)
    assert cut.choices[0].text == sdk.text[: sdk.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


async def test_eight_concurrent_streams_all_complete_correctly(served: Served) -> None:
    oa = served.openai()
    questions = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    expected = [(await served.client.chat(q, max_new_tokens=8)).text for q in questions]

    async def streamed(messages) -> str:
        stream = await oa.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert await asyncio.gather(*(streamed(q) for q in questions)) == expected
    metrics = (await asyncio.to_thread(_http, f"{served.url}/metrics"))[1]
    assert 'peerd_api_requests_total{endpoint="chat",model="tiny",status="200"} 8.0' in metrics
    assert "peerd_api_time_to_first_token_seconds_count" in metrics and "_created" not in metrics
    assert "process_cpu_seconds_total" in metrics


def _curl_events(url: str, body: dict[str, object]) -> list[str]:
    out = subprocess.run(
        ["curl", "-sN", "--max-time", "60", "-H", "Content-Type: application/json", "-d", json.dumps(body), url],
        capture_output=True, text=True, timeout=90, check=True,
    ).stdout  # fmt: skip
    return [line[6:] for line in out.split("\n\n") if line.startswith("data: ")]


async def test_curl_sees_one_event_per_token(served: Served) -> None:
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 10, "temperature": 0, "stream": True}
    events = await asyncio.to_thread(_curl_events, f"{served.url}/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["finish_reason"] is None]
    sdk = await served.client.generate("hello", max_new_tokens=10)
    # every token that completes text is its own event (the tiny vocabulary is a token per byte, and
    # a byte that may start a character waits for the next one), plus a last flush of any such byte
    decoded = [served.client.decode(sdk.token_ids[: i + 1]) for i in range(len(sdk.token_ids))]
    whole_chars = [i for i, t in enumerate(decoded) if not t.endswith("\ufffd") and (i == 0 or t != decoded[i - 1])]
    assert len(texts) == len(whole_chars) + decoded[-1].endswith("\ufffd")
    assert len(texts) >= 5
    assert "".join(texts) == sdk.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served: Served) -> None:
    oa = served.openai()
    with pytest.raises(openai.NotFoundError) as unknown:
        await oa.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as zero:
        await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=0)
    assert zero.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as large:
        await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=CONTEXT)
    assert large.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        await oa.completions.create(model=MODEL_ID, prompt="x" * (CONTEXT + 5), max_tokens=1)
    assert long_prompt.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, n=2)
    status, body = await asyncio.to_thread(_http, f"{served.url}/v1/chat/completions", b'{"model": "tiny", "mess')
    assert status == 400 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    lone = b'{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800"}]}'  # not UTF-8 text
    status, body = await asyncio.to_thread(_http, f"{served.url}/v1/chat/completions", lone)
    assert status == 400 and "not valid UTF-8" in json.loads(body)["error"]["message"], body
    status, body = await asyncio.to_thread(_http, f"{served.url}/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    ok = await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=3, temperature=0)
    assert ok.choices[0].message.content is not None


async def test_api_keys_overload_and_a_gap_in_the_swarm(make_swarm) -> None:
    swarm = await make_swarm()
    api = await _serve(swarm, api_keys=frozenset({"s3cret"}), max_concurrent_requests=1)
    try:
        with pytest.raises(openai.AuthenticationError):
            await api.openai(api_key="wrong").models.list()
        oa = api.openai(api_key="s3cret")
        # one request holds the only slot (its stream is open, not read to the end) ...
        held = await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=20, stream=True)
        async for _ in held:
            break
        # ... so a second one is told to come back later
        with pytest.raises(openai.RateLimitError) as busy:
            await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2)
        assert busy.value.response.headers["Retry-After"] == "1"
        await held.close()
        # a peer dies: its blocks have no server, so the swarm has a gap -> 503 with Retry-After
        await crash(swarm.peers[1])
        with pytest.raises(openai.InternalServerError) as gap:
            for _ in range(50):  # until the slot is free again (the held stream's clean-up)
                try:
                    await oa.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2)
                except openai.RateLimitError:
                    await asyncio.sleep(0.1)
        assert gap.value.status_code == 503 and gap.value.code == "no_route"
        assert gap.value.response.headers["Retry-After"] == "5"
    finally:
        await api.close()
