// peerd swarm health page: renders /api/v1/swarm (same origin) and refreshes it every few seconds.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere. Every string that comes
// from the DHT (peer names, devices, versions) is remote input: it only ever becomes a text node or an
// attribute value, never markup.
"use strict";

(() => {
  const REFRESH_S = 5;
  const STATES = ["online", "unreachable", "joining", "offline"];
  let timer = null;
  let inFlight = false;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function place(node, column, row) {
    // CSSOM writes are allowed by the page's Content-Security-Policy (style attributes are not)
    node.style.gridColumn = column;
    node.style.gridRow = row;
    return node;
  }

  const number = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  function shortId(peerId) {
    return peerId.length > 16 ? `${peerId.slice(0, 8)}…${peerId.slice(-6)}` : peerId;
  }

  function displayName(peer) {
    return peer.name || shortId(peer.peer_id);
  }

  function stateOf(peer) {
    // announced online, but this peer's probe got no answer: crashed, or not reachable from here
    if (peer.state === "online" && peer.reachable === false) return "unreachable";
    return STATES.includes(peer.state) ? peer.state : "unknown";
  }

  function runs(blocks) {
    // sorted block indices -> [first, last] of each run of consecutive ones: [4, 5, 7] -> [[4, 5], [7, 7]]
    const out = [];
    for (const b of blocks) {
      if (out.length && out[out.length - 1][1] === b - 1) out[out.length - 1][1] = b;
      else out.push([b, b]);
    }
    return out;
  }

  function ranges(blocks) {
    // [4, 5, 7] -> "4–5, 7"
    return runs(blocks)
      .map(([first, last]) => (first === last ? `${first}` : `${first}–${last}`))
      .join(", ");
  }

  function coverageClass(servers) {
    if (servers <= 0) return "cov-gap";
    if (servers === 1) return "cov-one";
    return "cov-many";
  }

  function summary(model) {
    const online = model.peers.filter((p) => stateOf(p) === "online").length;
    const gaps = model.gaps;
    const served = model.num_blocks - gaps.length;
    return el(
      "div",
      {
        class: "summary",
        "data-gaps": gaps.join(","),
        "data-peers": model.peers.length,
        "data-online": online,
      },
      el("span", { class: "chip" }, `${model.num_blocks} blocks`),
      el("span", { class: "chip" }, `${online} of ${model.peers.length} peers online`),
      el("span", { class: "chip" }, `${served} of ${model.num_blocks} blocks served`),
      gaps.length === 0
        ? el("span", { class: "chip chip-ok", id: `status-${model.model_id}` }, "every block is served")
        : el(
            "span",
            { class: "chip chip-bad", id: `status-${model.model_id}` },
            `GAP: block${gaps.length > 1 ? "s" : ""} ${ranges(gaps)} ${gaps.length > 1 ? "have" : "has"} no online peer`,
          ),
    );
  }

  function coverageMap(model) {
    const n = model.num_blocks;
    const peers = model.peers;
    const rows = 2 + peers.length;
    const labelEvery = n <= 32 ? 1 : n <= 64 ? 4 : 10;
    const grid = el("div", {
      class: `covmap${n > 48 ? " dense" : ""}`,
      role: "img",
      "aria-label": `coverage of ${n} blocks by ${peers.length} peers`,
    });
    grid.style.gridTemplateColumns = `minmax(8rem, 13rem) repeat(${n}, minmax(0, 1fr))`;
    grid.style.gridTemplateRows = `auto 1.8rem repeat(${peers.length}, 1.9rem)`;

    for (const [first, last] of runs(model.gaps)) {
      const title = first === last ? `block ${first}: no online peer` : `blocks ${first}–${last}: no online peer`;
      grid.append(
        place(
          el("div", { class: "gap-col", "data-gap-start": first, "data-gap-end": last + 1, title }),
          `${first + 2} / ${last + 3}`,
          `1 / ${rows + 1}`,
        ),
      );
    }
    grid.append(place(el("div", { class: "row-label axis" }, "block"), "1", "1"));
    for (let b = 0; b < n; b += 1) {
      const text = b % labelEvery === 0 ? String(b) : "";
      grid.append(place(el("div", { class: "blk-label", "data-block-label": b }, text), `${b + 2}`, "1"));
    }
    grid.append(place(el("div", { class: "row-label" }, "online peers"), "1", "2"));
    for (const c of model.coverage) {
      const title = `block ${c.block}: ${c.peers} online peer(s), ${number.format(c.decode_tokens_per_s)} tok/s decode`;
      grid.append(
        place(
          el(
            "div",
            { class: `cov ${coverageClass(c.peers)}`, "data-block": c.block, "data-servers": c.peers, title },
            n > 48 ? "" : String(c.peers),
          ),
          `${c.block + 2}`,
          "2",
        ),
      );
    }
    peers.forEach((peer, i) => {
      const row = `${i + 3}`;
      const state = stateOf(peer);
      grid.append(
        place(
          el("div", { class: "row-label peer-label", title: peer.peer_id }, displayName(peer), peer.self ? " ★" : ""),
          "1",
          row,
        ),
      );
      const title = `${displayName(peer)} · ${state} · blocks ${peer.start}:${peer.end} · ${peer.peer_id}`;
      grid.append(
        place(
          el(
            "div",
            {
              class: `span state-${state}`,
              "data-peer-id": peer.peer_id,
              "data-start": peer.start,
              "data-end": peer.end,
              "data-state": state,
              title,
            },
            `${peer.start}:${peer.end}`,
          ),
          `${peer.start + 2} / ${peer.end + 2}`,
          row,
        ),
      );
    });
    return grid;
  }

  function legend() {
    return el(
      "div",
      { class: "legend" },
      ...STATES.map((s) => el("span", { class: "legend-item" }, el("i", { class: `swatch state-${s}` }), s)),
      el("span", { class: "legend-item" }, el("i", { class: "swatch swatch-gap" }), "gap (no online peer)"),
      el("span", { class: "legend-item" }, el("i", { class: "swatch cov-one" }), "1 peer"),
      el("span", { class: "legend-item" }, el("i", { class: "swatch cov-many" }), "2+ peers"),
    );
  }

  function peerTable(doc, model) {
    const head = [
      "Name",
      "Peer ID",
      "State",
      "Blocks",
      "Throughput / block",
      "Observed",
      "Device",
      "Version",
      "RTT",
      "Cache free",
      "Announced",
      "Uplink",
      "Reached",
    ];
    const body = model.peers.map((peer) => {
      const state = stateOf(peer);
      const age = Math.max(0, doc.generated_at - peer.announced_at);
      let rtt = "—";
      if (peer.self) rtt = "this peer";
      else if (typeof peer.rtt_ms === "number") rtt = `${peer.rtt_ms.toFixed(1)} ms`;
      return el(
        "tr",
        { "data-peer-id": peer.peer_id, "data-state": state, class: peer.self ? "self" : null },
        el("td", { class: "name" }, displayName(peer)),
        el("td", { class: "mono", title: peer.peer_id }, shortId(peer.peer_id)),
        el("td", null, el("span", { class: `badge state-${state}` }, state)),
        el("td", { class: "num" }, `${peer.start}:${peer.end}`),
        el(
          "td",
          { class: "num", title: `per block: ${number.format(peer.prefill_tokens_per_s)} tok/s prefill` },
          `${number.format(peer.decode_tokens_per_s)} tok/s`,
        ),
        // one token through its blocks, timed by this peer (network included); the claim is beside it
        el(
          "td",
          { class: "num", "data-observed": peer.observed_tokens_per_s ?? "", title: "one token through its blocks, timed from this peer" },
          typeof peer.observed_tokens_per_s === "number" ? `${number.format(peer.observed_tokens_per_s)} tok/s` : "—",
        ),
        // the compute dtype, and how the weights are stored when quantised ("bfloat16 · nf4")
        el(
          "td",
          { "data-quant": peer.quant || "none" },
          [peer.device, peer.dtype, peer.quant && peer.quant !== "none" ? peer.quant : null].filter(Boolean).join(" · "),
        ),
        el("td", { class: "mono" }, peer.version),
        el("td", { class: "num" }, rtt),
        el("td", { class: "num" }, `${number.format(peer.cache_tokens_free)} tok`),
        el("td", { class: "num" }, peer.announced_at ? `${age.toFixed(0)} s ago` : "—"),
        // the peer's own measurement of how fast it uploads to other peers ("—": not yet)
        el("td", { class: "num" }, peer.uplink_bytes_per_s > 0 ? `${number.format(peer.uplink_bytes_per_s * 8e-6)} Mbit/s` : "—"),
        // "relayed": behind NAT, reached through peerd's relay; "direct": dialable; else unknown
        el("td", { "data-reach": peer.reach || "unknown", title: (peer.addrs || []).join("\n") }, peer.reach || "—"),
      );
    });
    return el(
      "table",
      { class: "peers", id: `peers-${model.model_id}` },
      el("thead", null, el("tr", null, ...head.map((h) => el("th", null, h)))),
      el("tbody", null, ...body),
    );
  }

  function renderModel(doc, model) {
    return el(
      "section",
      { class: "model", "data-model-id": model.model_id },
      el(
        "h2",
        null,
        model.model_id,
        el("span", { class: "swarm" }, ` · swarm “${model.swarm || "public"}”`),
      ),
      summary(model),
      el("h3", null, "Block coverage"),
      coverageMap(model),
      legend(),
      el("h3", null, "Peers"),
      model.peers.length ? peerTable(doc, model) : el("p", { class: "empty" }, "No peer announces this model."),
    );
  }

  function render(doc) {
    const me = doc.self || {};
    const when = new Date(doc.generated_at * 1000).toLocaleTimeString("en-GB");
    document.getElementById("meta").replaceChildren(
      "served by ",
      el("strong", null, me.name || shortId(me.peer_id || "?")),
      ` (${shortId(me.peer_id || "?")}, ${me.state || "?"}, peerd ${me.version || "?"}) · updated `,
      el("time", { id: "updated", datetime: new Date(doc.generated_at * 1000).toISOString() }, when),
    );
    document.getElementById("models").replaceChildren(...doc.models.map((m) => renderModel(doc, m)));
    document.body.dataset.loaded = "1";
    document.body.dataset.generatedAt = String(doc.generated_at);
  }

  function showError(text) {
    const box = document.getElementById("error");
    box.hidden = !text;
    box.textContent = text || "";
  }

  function schedule() {
    clearTimeout(timer);
    if (document.getElementById("auto-refresh").checked) timer = setTimeout(refresh, REFRESH_S * 1000);
  }

  async function refresh() {
    if (inFlight) return;
    if (document.hidden && document.body.dataset.loaded) {
      schedule();
      return;
    }
    inFlight = true;
    try {
      const response = await fetch("/api/v1/swarm", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      showError(null);
    } catch (err) {
      showError(`Could not load /api/v1/swarm: ${err.message}. Showing the last data; retrying.`);
    } finally {
      inFlight = false;
      schedule();
    }
  }

  document.getElementById("refresh-period").textContent = String(REFRESH_S);
  document.getElementById("auto-refresh").addEventListener("change", (event) => {
    if (event.target.checked) refresh();
    else clearTimeout(timer);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  refresh();
})();
