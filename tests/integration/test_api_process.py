"""`peerd api` as a user starts it: a process of its own, joined to a swarm of `peerd run` processes,
answering the OpenAI endpoints over HTTP (with a local draft model's guesses), and stopping cleanly
on SIGTERM; a draft model of another vocabulary is refused before it serves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from peerd.cli.demo import LocalSwarm
from tests.helpers.tiny_model import make_tiny_checkpoint

MODEL_ID = "tiny"


def _get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.status, json.loads(answer.read())


def test_peerd_api_process_serves_completions_and_stops_on_sigterm(tiny_ckpt: Path, tmp_path: Path) -> None:
    swarm = LocalSwarm(str(tiny_ckpt), workdir=tmp_path)
    api: subprocess.Popen[bytes] | None = None
    try:
        swarm.start_bootstrap(extra=["--model-id", MODEL_ID])
        peer = swarm.start_peer("a", (0, 6), ["--no-measure", "--model-id", MODEL_ID])
        swarm.wait_ready([peer], timeout_s=120)
        ready = tmp_path / "api.json"
        cmd = [sys.executable, "-m", "peerd", "api", "--initial-peers", ",".join(swarm.initial_peers)]
        cmd += ["--model", str(tiny_ckpt), "--model-id", MODEL_ID, "--port", "0", "--ready-file", str(ready)]
        cmd += ["--draft-model", str(tiny_ckpt)]  # the model as its own draft: every guess lands
        with (tmp_path / "api.log").open("wb") as log:
            api = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert api.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "peerd api not ready"
            time.sleep(0.2)
        url = json.loads(ready.read_text())["url"]

        status, models = _get(f"{url}/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == [MODEL_ID]  # type: ignore[index,union-attr]
        request = {"model": MODEL_ID, "prompt": "the sky is", "max_tokens": 5, "temperature": 0}
        status, done = _post(f"{url}/v1/completions", request)
        assert status == 200 and done["choices"][0]["finish_reason"] in ("length", "stop")  # type: ignore[index]
        assert 1 <= done["usage"]["completion_tokens"] <= 5  # type: ignore[index]
        assert _post(f"{url}/v1/completions", request)[1]["choices"] == done["choices"]  # greedy: same text
        # fewer trips through the swarm than tokens: the draft model's guesses were confirmed
        tokens, extras = done["usage"]["completion_tokens"], done["peerd"]  # type: ignore[index]
        assert extras["accepted_guesses"] > 0 and extras["steps"] == tokens - extras["accepted_guesses"]  # type: ignore[index]

        api.send_signal(signal.SIGTERM)
        assert api.wait(30) == 0, (tmp_path / "api.log").read_text()
    finally:
        if api is not None and api.poll() is None:
            api.kill()
            api.wait(10)
        swarm.stop()


def test_peerd_api_refuses_a_draft_model_of_another_vocabulary_before_serving(tiny_ckpt: Path, tmp_path: Path) -> None:
    swarm = LocalSwarm(str(tiny_ckpt), workdir=tmp_path)
    try:
        swarm.start_bootstrap(extra=["--model-id", MODEL_ID])
        other = make_tiny_checkpoint(tmp_path / "other-vocab", num_layers=1, vocab_size=300)
        ready = tmp_path / "api.json"
        cmd = [sys.executable, "-m", "peerd", "api", "--initial-peers", ",".join(swarm.initial_peers)]
        cmd += ["--model", str(tiny_ckpt), "--model-id", MODEL_ID, "--port", "0", "--ready-file", str(ready)]
        done = subprocess.run([*cmd, "--draft-model", str(other)], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and not ready.exists()
        assert "share the swarm model's tokenizer" in done.stderr
    finally:
        swarm.stop()
