// peerd web chat: talks to this server's OpenAI-compatible API only (no build step, nothing from elsewhere).
"use strict";

const history = [];
// ?max_tokens=N caps each reply (default 256)
const maxTokens = Number(new URLSearchParams(location.search).get("max_tokens")) || 256;
let model = null;
let apiKey = sessionStorage.getItem("peerd-api-key") || "";

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function api(path, init) {
  let response = await fetch(path, { ...init, headers: headers() });
  if (response.status === 401) {  // the operator set --api-key: ask once, keep it for this tab
    apiKey = window.prompt("This server needs an API key:") || "";
    sessionStorage.setItem("peerd-api-key", apiKey);
    response = await fetch(path, { ...init, headers: headers() });
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Server-sent events arrive in arbitrary pieces: split on blank lines, keep the unfinished tail.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function ask(question) {
  history.push({ role: "user", content: question });
  addTurn("user", question);
  const answer = addTurn("assistant", "");
  answer.classList.add("streaming");
  $("send").disabled = true;
  showError("");
  const started = performance.now();
  let tokens = 0;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      body: JSON.stringify({ model, messages: history, stream: true, temperature: 0,
                             max_tokens: maxTokens, stream_options: { include_usage: true } }),
    });
    let info = null;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) answer.textContent += delta.content;
      if (chunk.peerd) info = chunk.peerd;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    }
    history.push({ role: "assistant", content: answer.textContent });
    const seconds = (performance.now() - started) / 1000;
    if (info) {
      const route = document.createElement("span");
      route.className = "route";
      route.textContent = "route: " + info.route.join(" → ");
      answer.appendChild(route);
      $("stats").textContent = `${tokens} tokens in ${seconds.toFixed(1)} s · ${info.tokens_per_s} tokens/s · ` +
        `first token after ${(info.time_to_first_token_s * 1000).toFixed(0)} ms`;
    }
  } catch (err) {
    history.pop();
    showError(String(err.message || err));
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "1";
    $("send").disabled = false;
  }
}

async function start() {
  try {
    const models = await (await api("/v1/models")).json();
    model = models.data[0].id;
    $("model").textContent = "model " + model + " · through a peer-to-peer swarm";
  } catch (err) {
    showError("cannot reach the API: " + err.message);
  }
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || $("send").disabled) return;
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("reset").addEventListener("click", () => {
    history.length = 0;
    $("log").textContent = "";
    $("stats").textContent = "";
  });
}

start();
