"""The daemon's HTTP side on real in-process peers: /metrics counts what happened, the health page,
its JSON API and the probe answer, and the HTTP server (Starlette on uvicorn) refuses what it does
not serve."""

from __future__ import annotations

import asyncio
import json
import time

from prometheus_client.parser import text_string_to_metric_families

from peerd.daemon.routes import API_CACHE_S
from peerd.rpc.errors import PeerError
from peerd.rpc.transport import PeerClient
from protocols import ErrorCode
from tests.helpers.swarm import crash

PROMPT = [1, 5, 9, 23, 42, 7]
NEW_TOKENS = 8


async def http_request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 15)  # the server closes after one response
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await http_request(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


async def test_metrics_count_tokens_sessions_bytes_and_errors(make_swarm) -> None:
    swarm = await make_swarm(http_port=0)
    client = await swarm.client()
    try:
        result = await client.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
        assert len(result.token_ids) == NEW_TOKENS
        with_error = swarm.peers[1]
        stranger = PeerClient(client.p2p, "not-this-model", timeout_s=10)
        try:
            await stranger.info(with_error.peer_id)
            raise AssertionError("a peer answered a request for another model")
        except PeerError as exc:
            assert exc.code is ErrorCode.WRONG_MODEL
    finally:
        await client.close()

    for peer in swarm.peers:
        assert peer.http_port is not None and peer.stage is not None
        # the server ends the session when the client's close frame arrives: poll, never sleep blindly
        deadline = time.monotonic() + 10
        while True:
            m = await scrape(peer.http_port)
            if value(m, "peerd_sessions_active") == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        # every token of the prompt once (prefill), then one decode step per generated token but the last
        assert value(m, "peerd_tokens_processed_total", phase="prefill") == len(PROMPT)
        assert value(m, "peerd_tokens_processed_total", phase="decode") == NEW_TOKENS - 1
        assert value(m, "peerd_tokens_processed_total", phase="forward") == 0
        # the first peer had nobody to ask; the others were dialled back by it on 127.0.0.1
        reach = "unknown" if peer is swarm.peers[0] else "direct"
        assert value(m, "peerd_reach", reach=reach) == 1 and value(m, "peerd_reach", reach="relayed") == 0
        assert value(m, "peerd_inference_step_duration_seconds_count", phase="prefill") == 1
        assert value(m, "peerd_inference_step_duration_seconds_count", phase="decode") == NEW_TOKENS - 1
        assert 0 < value(m, "peerd_inference_step_duration_seconds_sum", phase="decode") < 30
        assert value(m, "peerd_requests_total", rpc="inference", outcome="ok") == 1
        assert value(m, "peerd_request_duration_seconds_count", rpc="inference") == 1
        assert value(m, "peerd_sessions_opened_total") == 1
        assert value(m, "peerd_sessions_active") == 0
        assert value(m, "peerd_kv_cache_used_bytes") == 0
        assert value(m, "peerd_kv_cache_limit_bytes") > 0
        assert value(m, "peerd_sessions_limit") == peer.config.max_sessions
        # hidden states are [1, tokens, 64] float32: at least that much went each way
        hidden_bytes = 4 * 64 * (len(PROMPT) + NEW_TOKENS - 1)
        assert value(m, "peerd_network_received_bytes_total") > hidden_bytes
        assert value(m, "peerd_network_sent_bytes_total") > hidden_bytes
        assert value(m, "peerd_hosted_block_start") == peer.stage.start
        assert value(m, "peerd_hosted_block_end") == peer.stage.end
        assert value(m, "peerd_hosted_blocks") == 2
        weights = sum(p.numel() * p.element_size() for p in peer.stage.parameters())  # not quantised here
        assert value(m, "peerd_hosted_weights_bytes") == weights > 0
        assert value(m, "peerd_throughput_tokens_per_second", phase="decode") > 0
        assert value(m, "peerd_peer_state", state="online") == 1
        assert value(m, "peerd_peer_state", state="offline") == 0
        info = {dict(k[1])["name"]: dict(k[1]) for k in m if k[0] == "peerd_peer_info"}
        assert info[peer.config.public_name]["peer_id"] == peer.peer_id
        assert info[peer.config.public_name]["model"] == "tiny"
        assert info[peer.config.public_name]["quant"] == "none"
        assert value(m, "peerd_dht_known_peers") >= 1
        assert value(m, "peerd_swarm_peers", state="online") == 3
        assert value(m, "peerd_swarm_blocks") == 6
        assert value(m, "peerd_swarm_blocks_uncovered") == 0
        assert [value(m, "peerd_swarm_block_servers", block=str(b)) for b in range(6)] == [1] * 6
        assert value(m, "process_resident_memory_bytes") > 50e6
        assert value(m, "process_cpu_seconds_total") > 0
        assert value(m, "peerd_rebalance_moves_total") == 0
        wrong_model = value(m, "peerd_errors_total", code="wrong_model")
        assert wrong_model == (1 if peer is with_error else 0)
        assert value(m, "peerd_errors_total", code="cache_full") == 0


async def test_health_page_api_and_probe(make_swarm) -> None:
    swarm = await make_swarm(http_port=0)
    peer = swarm.peers[0]
    port = peer.http_port
    assert port is not None

    status, headers, body = await http_request(port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="/static/app.js"' in body and b'href="/static/style.css"' in body
    assert "script-src 'self'" in headers["content-security-policy"]
    for path, kind in [("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")]:
        status, headers, body = await http_request(port, path)
        assert status == 200 and headers["content-type"].startswith(kind) and len(body) > 1000

    first_asked = time.monotonic()
    status, headers, body = await http_request(port, "/api/v1/swarm")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["self"]["peer_id"] == peer.peer_id and doc["self"]["name"] == "peer0"
    (model,) = doc["models"]
    assert model["model_id"] == "tiny" and model["num_blocks"] == 6 and model["gaps"] == []
    assert [c["peers"] for c in model["coverage"]] == [1] * 6
    by_name = {p["name"]: p for p in model["peers"]}
    assert sorted(by_name) == ["peer0", "peer1", "peer2"]
    assert [(by_name[n]["start"], by_name[n]["end"]) for n in sorted(by_name)] == [(0, 2), (2, 4), (4, 6)]
    assert by_name["peer0"]["self"] and by_name["peer0"]["rtt_ms"] == 0.0
    for other in ("peer1", "peer2"):
        rtt = by_name[other]["rtt_ms"]
        assert rtt is not None and 0 < rtt < 5000
    # a second look within the cache window reuses the same DHT read; the window is wall time, so
    # judge only when both looks fit in it (tests/unit/test_web_swarm.py covers it with a fake clock)
    _, _, again = await http_request(port, "/api/v1/swarm")
    if time.monotonic() - first_asked < API_CACHE_S:
        assert json.loads(again)["generated_at"] == doc["generated_at"]

    status, _, body = await http_request(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = await http_request(port, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert (await http_request(port, "/nope"))[0] == 404
    assert (await http_request(port, "/metrics", method="POST"))[0] == 405
    try:  # a request head far over h11's 16 KiB limit: refused, or cut off while still being sent
        assert (await http_request(port, "/" + "x" * 200_000))[0] == 400
    except ConnectionResetError:
        pass
    assert (await http_request(port, "/metrics"))[0] == 200  # and the server keeps serving


async def test_health_api_marks_an_online_record_that_does_not_answer_as_unreachable(make_swarm) -> None:
    """A peer killed without a goodbye leaves an online record until it expires: the page must not
    call it online. The API says ``reachable: false`` once its probe fails (the page shows
    "unreachable"), while peers that answer are ``reachable: true``."""
    swarm = await make_swarm(http_port=0)
    watcher, victim = swarm.peers[0], swarm.peers[2]
    await crash(victim)  # before the health page ever probed it
    assert watcher.http_port is not None
    _, _, body = await http_request(watcher.http_port, "/api/v1/swarm")
    peers = {p["peer_id"]: p for p in json.loads(body)["models"][0]["peers"]}
    assert peers[victim.peer_id]["state"] == "online"  # what its last record says
    assert peers[victim.peer_id]["reachable"] is False and peers[victim.peer_id]["rtt_ms"] is None
    assert peers[swarm.peers[1].peer_id]["reachable"] is True
    assert peers[watcher.peer_id]["reachable"] is True
