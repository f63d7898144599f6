"""Helpers for the slow observability tests: a swarm of real `peerd run` processes with HTTP ports,
a real Prometheus server configured from deploy/prometheus.yml, headless Chromium, and polling.

Everything binds 127.0.0.1, every wait has a deadline, and every process started here is stopped
by the context manager that started it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from peerd.cli.demo import LocalSwarm

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
CHROMIUM = "/usr/bin/chromium"
T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.25) -> T:
    """Call ``check`` until it returns something other than None/False; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except (OSError, ValueError, KeyError, urllib.error.URLError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s (last error: {last_error!r})")
        time.sleep(interval_s)


def get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return bytes(response.read())


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    return json.loads(get(url, timeout_s))


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot report the port they bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunningPeer:
    name: str
    blocks: tuple[int, int]
    peer_id: str
    http_port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@contextlib.contextmanager
def http_swarm(
    model_path: Path,
    spans: Sequence[tuple[int, int]],
    workdir: Path,
    announce_period_s: float = 3.0,
    peer_args: Sequence[Sequence[str]] = (),
) -> Iterator[tuple[LocalSwarm, list[RunningPeer]]]:
    """A bootstrap node and one `peerd run` process per span, each with an HTTP port (and ``peer_args[i]``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with LocalSwarm(str(model_path), workdir=workdir) as swarm:
        swarm.start_bootstrap(timeout_s=180)  # generous: CI boxes are small and busy
        extra = [
            "--no-measure",
            "--http-port",
            "0",
            "--announce-period",
            str(announce_period_s),
            "--torch-threads",
            "1",
        ]
        own = [list(a) for a in peer_args] + [[]] * (len(spans) - len(peer_args))
        procs = [swarm.start_peer(f"peer{i + 1}", span, extra + own[i]) for i, span in enumerate(spans)]
        infos = swarm.wait_ready(procs, timeout_s=180)
        peers = [
            RunningPeer(p.name, span, str(info["peer_id"]), int(info["http_port"]), p.popen.pid)  # type: ignore[call-overload]
            for p, span, info in zip(procs, spans, infos, strict=True)
        ]
        yield swarm, peers


def stop_peers(swarm: LocalSwarm, names: Sequence[str], timeout_s: float = 30.0) -> None:
    """SIGTERM peers we started (they drain and announce offline, all at once) and wait for them to exit."""
    procs = [p for p in swarm.procs if p.name in names]
    assert len(procs) == len(names), f"unknown peers in {names}"
    for proc in procs:
        proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.popen.wait(timeout_s)


def prometheus_config_for(targets: Sequence[str], scrape_interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus.yml with the peerd job's targets replaced by ``targets`` and a fast interval.

    Everything else (job name, metrics path, target labels) is the deployed file's, so the test
    scrapes the way a real deployment does.
    """
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval=scrape_interval, scrape_timeout=scrape_interval, evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "peerd"]
    labels = job["static_configs"][0].get("labels", {})
    job["static_configs"] = [{"targets": list(targets), "labels": labels}]
    config["scrape_configs"] = [job]
    return dict(config)


class Prometheus:
    """A real Prometheus server (Debian's `prometheus`) on a free loopback port, data in a temp dir."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus; .ci/run does it)")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self._ready, 60, "Prometheus ready")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
        return get(f"{self.url}/-/ready", 2).startswith(b"Prometheus")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        doc = get_json(f"{self.url}/api/v1/{path}?{query}")
        if doc.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises AssertionError on a PromQL error."""
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as exc:  # 400/422: the expression is bad
            raise AssertionError(f"PromQL error for {expr!r}: {exc.read().decode()}") from exc
        return list(data["result"])

    def by_instance(self, expr: str) -> dict[str, float]:
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in self.query(expr)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def chromium(url: str, profile_dir: Path, *, screenshot: Path | None = None, budget_ms: int = 5000) -> str:
    """Open ``url`` in headless Chromium; return the DOM after scripts ran (or save a screenshot)."""
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile_dir}",
        f"--virtual-time-budget={budget_ms}",
    ]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        args += [f"--screenshot={screenshot}", "--window-size=1400,900"]
    else:
        args += ["--dump-dom"]
    result = subprocess.run([*args, url], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout
