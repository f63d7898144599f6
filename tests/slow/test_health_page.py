"""The swarm health page in headless Chromium, served by a real `peerd run` process: every peer and
the coverage of every block appear in the rendered DOM, and a gap is shown once peers leave.
Screenshots go to artifacts/ (gitignored): look at them after a run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.helpers.observability import ARTIFACTS, CHROMIUM, chromium, get_json, http_swarm, stop_peers, wait_until
from tests.helpers.tiny_model import make_tiny_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium (.ci/run installs it)"),
]

# peer4 overlaps peer2 and peer3, so blocks 3..5 have two servers until peer3 and peer4 leave
SPANS = [(0, 2), (2, 4), (4, 6), (3, 6)]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[Element]:
        """Descendants with ``tag`` whose attributes match (value None: present with any value)."""
        out = []
        for c in self.children:
            if isinstance(c, Element):
                if (tag is None or c.tag == tag) and all(
                    k.replace("_", "-") in c.attrs and (v is None or c.attrs[k.replace("_", "-")] == v)
                    for k, v in attrs.items()
                ):
                    out.append(c)
                out.extend(c.find_all(tag, **attrs))
        return out


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    return builder.root


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, list, Path]]:
    tmp = tmp_path_factory.mktemp("health")
    ckpt = make_tiny_checkpoint(tmp / "tiny", num_layers=6)
    # offline records live two announce periods: long enough to still be on the page after the peers left
    # the fourth peer stores its weights in 4 bits: the page shows it beside the dtype
    args = [[], [], [], ["--quant", "nf4"]]
    with http_swarm(ckpt, SPANS, tmp / "swarm", announce_period_s=15.0, peer_args=args) as (local, peers):
        yield local, peers, tmp


def api_model(url: str) -> dict:
    (model,) = get_json(f"{url}/api/v1/swarm")["models"]
    return dict(model)


def render(url: str, profile: Path, screenshot: Path) -> Element:
    dom = parse(chromium(url, profile))
    chromium(url, profile, screenshot=screenshot)
    assert screenshot.stat().st_size > 10_000
    return dom


def test_health_page_shows_every_peer_and_block_then_the_gap(swarm) -> None:
    local, peers, tmp = swarm
    page = peers[0].url + "/"
    wait_until(
        lambda: [p["state"] for p in api_model(peers[0].url)["peers"]] == ["online"] * 4,
        60,
        "all four peers online in the DHT view",
    )
    quants = {p["peer_id"]: p["quant"] for p in api_model(peers[0].url)["peers"]}
    assert quants == {p.peer_id: "nf4" if p is peers[3] else "none" for p in peers}

    dom = render(page, tmp / "chrome", ARTIFACTS / "health-page.png")
    (body,) = dom.find_all("body")
    assert body.attrs.get("data-loaded") == "1", "the page's script did not render the API data"
    (section,) = dom.find_all("section", data_model_id="tiny")
    rows = {r.attrs["data-peer-id"]: r for r in section.find_all("tr", data_peer_id=None)}
    assert set(rows) == {p.peer_id for p in peers}
    for p in peers:
        cells = [td.text() for td in rows[p.peer_id].find_all("td")]
        assert cells[0] == p.name and cells[2] == "online" and cells[3] == f"{p.blocks[0]}:{p.blocks[1]}"
        assert cells[-1] == "direct"  # Reached, the last column: the bootstrap node dialled each peer back
        assert cells[-2] == "—" or cells[-2].endswith("Mbit/s")  # Uplink: once measured, in Mbit/s
        quant = "nf4" if p is peers[3] else "none"
        (device,) = rows[p.peer_id].find_all("td", data_quant=quant)
        assert device.text() == ("cpu · float32 · nf4" if quant == "nf4" else "cpu · float32")
        (span,) = section.find_all("div", data_peer_id=p.peer_id, data_start=str(p.blocks[0]))
        assert (
            span.tag == "div" and span.attrs["data-end"] == str(p.blocks[1]) and "state-online" in span.attrs["class"]
        )
    coverage = {int(c.attrs["data-block"]): c for c in section.find_all("div", data_servers=None)}
    assert {b: int(c.attrs["data-servers"]) for b, c in coverage.items()} == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 2}
    assert all(c.text() == c.attrs["data-servers"] for c in coverage.values())
    (summary,) = section.find_all("div", data_gaps=None)
    assert summary.attrs["data-gaps"] == "" and "every block is served" in summary.text()
    assert not section.find_all("div", data_gap_start=None)
    assert (rows[peers[0].peer_id].find_all("td")[8]).text() == "this peer"
    # Observed, beside the claim: the page's peer timed one token through each other peer's blocks
    assert rows[peers[0].peer_id].find_all("td")[5].text() == "—"  # it does not probe itself
    for p in peers[1:]:
        assert rows[p.peer_id].find_all("td")[5].text().endswith("tok/s"), "observed speed not measured"

    # peer3 (4:6) and peer4 (3:6) leave gracefully: they announce "offline", blocks 4 and 5 lose every server
    stop_peers(local, [p.name for p in peers[2:]])
    wait_until(lambda: api_model(peers[0].url)["gaps"] == [4, 5], 60, "the gap in the DHT view")

    dom = render(page, tmp / "chrome", ARTIFACTS / "health-page-gap.png")
    (section,) = dom.find_all("section", data_model_id="tiny")
    states = {r.attrs["data-peer-id"]: r.attrs["data-state"] for r in section.find_all("tr", data_peer_id=None)}
    assert states == {peers[0].peer_id: "online", peers[1].peer_id: "online"} | {
        p.peer_id: "offline" for p in peers[2:]
    }
    coverage = {int(c.attrs["data-block"]): c for c in section.find_all("div", data_servers=None)}
    assert {b: int(c.attrs["data-servers"]) for b, c in coverage.items()} == {0: 1, 1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    assert all("cov-gap" in coverage[b].attrs["class"] for b in (4, 5))
    (overlay,) = section.find_all("div", data_gap_start=None)  # one highlight over the run of gap blocks
    assert (overlay.attrs["data-gap-start"], overlay.attrs["data-gap-end"]) == ("4", "6")
    (summary,) = section.find_all("div", data_gaps=None)
    assert summary.attrs["data-gaps"] == "4,5" and "GAP: blocks 4–5 have no online peer" in summary.text()
