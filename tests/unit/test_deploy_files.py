"""Deploy files checked as far as a machine without a Docker engine allows.

The compose file, Dockerfile, Prometheus and Grafana provisioning, dashboard and systemd unit must
agree with each other and with the CLI: every `peerd` command line in them parses with the real
argument parser, ports and paths line up, referenced files exist, and every metric a dashboard
query names is one a peer exports. Nothing here builds an image or starts a container.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peerd.cli.parser import build_parser
from peerd.model.registry import DEFAULT_MODEL_ID, KNOWN_MODELS
from peerd.server.metrics import PeerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PEERS = ("peer1", "peer2", "peer3")
FAKE_BOOTSTRAP = "/dns4/bootstrap/tcp/31330/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def parse_cli(argv: list[str]) -> Any:
    """Parse like `peerd` would; argparse errors (unknown options, bad values) fail the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`peerd {shlex.join(argv)}` does not parse") from exc


def script_defaults(script: Path) -> dict[str, str]:
    """``VAR="${ENV_NAME:-default}"`` assignments of a shell script: ENV_NAME -> default."""
    return dict(re.findall(r'"\$\{(\w+):-([^}]*)\}"', script.read_text()))


# --- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages


def image_env() -> dict[str, str]:
    """ENV of the final stage (KEY=value pairs)."""
    final = dockerfile_stages()[-1]
    return {k: v for name, args in final if name == "ENV" for k, v in re.findall(r"(\w+)=(\S+)", args)}


def test_dockerfile_final_stage_is_non_root_peerd_with_volume_and_healthcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build tools and the model converter must stay out of the final image"
    final = stages[-1]
    instr = {name: args for name, args in final}  # the last of each kind wins, as in Docker
    assert json.loads(instr["ENTRYPOINT"]) == ["peerd"]
    assert instr["USER"] not in ("root", "0") and not instr["USER"].startswith("0:")
    env = dict(re.findall(r"(\w+)=(\S+)", instr["ENV"]))
    assert json.loads(instr["VOLUME"])[0] == env["PEERD_CACHE_DIR"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # as inside the container: PEERD_* variables set the defaults
    exposed = {int(p.split("/")[0]) for p in instr["EXPOSE"].split()}
    # the image's own CMD, and the header's examples (other command lines, same HTTP port and key)
    header = [line.split("peerd:latest", 1)[1].split() for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("#   docker run") and "peerd:latest" in line]  # fmt: skip
    assert {h[0] for h in header} == {"run", "bootstrap"}
    for argv in [json.loads(instr["CMD"]), *header]:
        args = parse_cli(argv)
        assert args.command in ("run", "bootstrap") and args.http_host == "0.0.0.0" and args.host == "0.0.0.0"
        assert str(args.http_port) == env["PEERD_HTTP_PORT"], argv  # where the HEALTHCHECK looks
        assert Path(args.identity).parent.as_posix() in json.loads(instr["VOLUME"]), (
            "identity must outlive the container"
        )
        assert {args.port, args.http_port} <= exposed
    health = instr["HEALTHCHECK"]
    assert "/healthz" in health and "PEERD_HTTP_PORT" in health and "--start-period" in health
    global_args = dict(re.findall(r"^ARG (\w+)=(\S+)", (ROOT / "Dockerfile").read_text(), re.M))
    stage_names = set()
    for stage in stages:
        _, from_args = stage[0]
        image, *alias = from_args.split()
        if image not in stage_names:
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image)
            assert ":" in image and not image.endswith(":latest"), f"base image {image} must be pinned to a tag"
        if alias:
            stage_names.add(alias[-1])


def test_dockerfile_pins_torch_and_copies_only_what_dockerignore_lets_in() -> None:
    lines = [args for stage in dockerfile_stages() for name, args in stage if name == "RUN"]
    torch_install = [line for line in lines if re.search(r"pip install .*\btorch\b", line)]
    assert torch_install and all("-c constraints.txt" in line for line in torch_install)
    assert any("peerd model fetch" in line for line in lines)
    allowed = {
        line.lstrip("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert patterns[0] == "*", ".dockerignore lists what goes in, so .venv, models and .git never do"
    for stage in dockerfile_stages():
        for name, args in stage:
            if name != "COPY" or "--from=" in args:
                continue
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded from the build context by .dockerignore"


# --- docker-compose ---------------------------------------------------------------------------------


def test_compose_wires_bootstrap_three_peers_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"bootstrap", *PEERS, "prometheus", "grafana"} <= set(services)
    build = services["bootstrap"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    images = {services[s]["image"] for s in ("bootstrap", *PEERS)}
    assert images == {"peerd:latest"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for dep in service.get("depends_on", []):
            assert dep in services


def test_compose_peer_commands_parse_and_agree_with_the_join_script(compose: dict[str, Any]) -> None:
    services = compose["services"]
    script = DEPLOY / "join-swarm.sh"
    defaults = script_defaults(script)
    boot = parse_cli(services["bootstrap"]["command"])
    assert boot.command == "bootstrap" and boot.host == "0.0.0.0" and boot.new_swarm
    assert str(boot.port) == defaults["PEERD_BOOTSTRAP_PORT"]
    assert boot.ready_file == defaults["PEERD_BOOTSTRAP_READY_FILE"]
    assert boot.ready_file in " ".join(services["bootstrap"]["healthcheck"]["test"])
    assert any(v.endswith(":" + str(Path(boot.ready_file).parent)) for v in services["bootstrap"]["volumes"])
    assert defaults["PEERD_BOOTSTRAP_HOST"] == "bootstrap"

    spans = []
    for name in PEERS:
        service = services[name]
        entry = service["entrypoint"]
        assert entry[0] == "/bin/sh"
        mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert (DEPLOY / mounted[entry[1]]).resolve() == script
        args = parse_cli([*service["command"], "--initial-peers", FAKE_BOOTSTRAP])  # what the script runs
        assert args.command == "run" and args.name == name
        assert args.host == "0.0.0.0" and args.http_host == "0.0.0.0", "Prometheus reaches peers over the network"
        assert any(p.endswith(f":{args.http_port}") for p in service["ports"])
        # the image's HEALTHCHECK probes $PEERD_HTTP_PORT: the peer must serve HTTP there
        env = {**image_env(), **service.get("environment", {})}
        assert "healthcheck" not in service and str(args.http_port) == env["PEERD_HTTP_PORT"]
        assert args.identity.startswith("/var/lib/peerd/") and args.identity != boot.identity
        assert service["depends_on"]["bootstrap"]["condition"] == "service_healthy"
        spans.append(args.blocks)
    num_layers = KNOWN_MODELS[DEFAULT_MODEL_ID].expected.num_hidden_layers
    assert sorted(spans)[0][0] == 0 and sorted(spans)[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in zip(sorted(spans), sorted(spans)[1:])), "peers must cover every block"
    api_service = services["api"]
    api = parse_cli([*api_service["command"], "--initial-peers", FAKE_BOOTSTRAP])  # what the script runs
    assert api.command == "api" and api.host == "0.0.0.0"
    assert any(p.endswith(f":{api.port}") for p in api_service["ports"])
    assert api_service["environment"]["PEERD_HTTP_PORT"] == str(api.port)  # the image's HEALTHCHECK
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert any(f"api:{api.port}" in c["static_configs"][0]["targets"] for c in scraped)
    client = parse_cli(["generate", "Why is the sky blue?", "--initial-peers", FAKE_BOOTSTRAP])
    assert client.prompt == "Why is the sky blue?"


def test_join_script_execs_peerd_with_the_bootstrap_multiaddr_last(tmp_path: Path) -> None:
    ready = tmp_path / "bootstrap.json"
    ready.write_text(json.dumps({"peer_id": "QmBoot", "maddrs": ["/ip4/172.18.0.2/tcp/31330/p2p/QmBoot"]}))
    fake = tmp_path / "bin" / "peerd"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    python_dir = tmp_path / "python"
    python_dir.mkdir()
    (python_dir / "python").symlink_to(sys.executable)
    env = {
        "PATH": f"{fake.parent}:{python_dir}:/usr/bin:/bin",
        "PEERD_BOOTSTRAP_READY_FILE": str(ready),
    }
    out = subprocess.run(
        ["/bin/sh", str(DEPLOY / "join-swarm.sh"), "generate", "hello world", "--max-new-tokens", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.splitlines() == [
        "generate",
        "hello world",
        "--max-new-tokens",
        "5",
        "--initial-peers",
        "/dns4/bootstrap/tcp/31330/p2p/QmBoot",
    ]


# --- Prometheus and Grafana -------------------------------------------------------------------------


def test_prometheus_scrapes_every_compose_peer_on_its_http_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "peerd"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name in PEERS:
        args = parse_cli([*compose["services"][name]["command"], "--initial-peers", FAKE_BOOTSTRAP])
        expected.add(f"{name}:{args.http_port}")
    assert targets == expected
    prom = compose["services"]["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert any(v == f"./prometheus.yml:{config_path}:ro" for v in prom["volumes"])
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    prom_listen = [a for a in compose["services"]["prometheus"]["command"] if a.startswith("--web.listen-address=")]
    assert source["url"] == f"http://prometheus:{prom_listen[0].rsplit(':', 1)[1]}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "peerd.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert (DEPLOY / mounts[dash_dir]).resolve() == DASHBOARDS
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARDS / Path(home).relative_to(dash_dir)).is_file()


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def exported_sample_names() -> set[str]:
    metrics = PeerMetrics()
    metrics.set_swarm_view(2, [{"state": "online"}], [1, 1])  # per-block series exist once a view was read
    text = generate_latest(metrics.registry).decode()
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    # `peerd api`'s series are all labelled by model, so none exists before a request: name them from
    # the families its registry describes
    from peerd.api.metrics import ApiMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in ApiMetrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_queries_name_only_exported_series(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exported = exported_sample_names()
    exprs = []
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            assert panel.get("repeat") in (None, *variables)
            continue
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            exprs.append(t["expr"])
            for name in re.findall(r"\b((?:peerd|process)_[a-z0-9_]+)", t["expr"]):
                assert name in exported, f"{panel['title']!r} queries {name}, which no peer exports"
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"undeclared variable ${var}"
    needs = {
        "peerd-swarm.json": (
            "tokens_processed",
            "step_duration",
            "sessions_active",
            "kv_cache",
            "errors",
            "swarm_block",
        ),
        # request-level latency of `peerd api`, as vLLM's dashboards show it
        "peerd-api.json": ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "requests_waiting"),
    }[path.name]
    assert len(exprs) >= (20 if path.name == "peerd-swarm.json" else 8)
    for needed in needs:
        assert any(needed in e for e in exprs), needed
    for variable in dashboard["templating"]["list"]:
        for name in re.findall(r"\b((?:peerd|process)_[a-z0-9_]+)", variable["definition"]):
            assert name in exported


# --- systemd ------------------------------------------------------------------------------------------


def test_systemd_unit_runs_peerd_as_its_own_user_and_its_command_parses() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "peerd.service")
    service = unit["Service"]
    assert service["User"] not in ("root", "0") and service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed", "SIGTERM must reach peerd alone, so it can drain before stopping p2pd"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env_example = (DEPLOY / "systemd" / "peerd.env").read_text()
    peerd_args = re.search(r"^PEERD_ARGS=(.*)$", env_example, re.M)
    assert peerd_args is not None
    exec_start = shlex.split(service["ExecStart"].replace("$PEERD_ARGS", peerd_args.group(1)))
    assert exec_start[0] == "/opt/peerd/bin/peerd"
    args = parse_cli(exec_start[1:])
    assert args.command == "run" and args.host == "0.0.0.0" and args.http_port is not None
    assert args.identity.startswith("/var/lib/peerd/") and service["StateDirectory"] == "peerd"
    text = (DEPLOY / "systemd" / "peerd.service").read_text()
    assert f"Environment=PEERD_CACHE_DIR=/var/cache/{service['CacheDirectory']}" in text
    fetch = shlex.split(service["ExecStartPre"])
    assert fetch[0] == exec_start[0] and parse_cli(fetch[1:]).command == "model"
