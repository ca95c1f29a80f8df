// byollm chat page: a client of the server's OpenAI-compatible API (streamed chat completions).
// Rule of this file: text from the model, from documents or from the server goes into the page with
// textContent only (never innerHTML), so a reply that contains "<script>" is shown, not run.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, model: "byollm", rag: false, auth: false };
const KEY_STORAGE = "byollm.apiKey"; // sessionStorage: gone when the tab closes, never sent anywhere but here

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addMessage(role, text) {
  const box = element("div", `message ${role}`);
  box.append(element("span", "role", role === "user" ? "You" : state.model));
  const body = element("span", "body", text);
  box.append(body);
  $("conversation").append(box);
  box.scrollIntoView({ block: "end" });
  return { box, body };
}

function showError(text) {
  const error = $("error");
  error.textContent = text;
  error.hidden = !text;
}

// One clear sentence for each way the server can refuse.
async function describeRefusal(response) {
  let message = "";
  let code = "";
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.detail || "";
    code = (body.error && body.error.code) || "";
  } catch (_) { /* not JSON */ }
  switch (response.status) {
    case 401: return "The server refused the API key (401): type a valid key under Settings.";
    case 429: {
      const wait = response.headers.get("Retry-After");
      return `Rate limit reached (429)${wait ? `: try again in ${wait} s` : ""}. ${message}`.trim();
    }
    case 503: return `The server is busy or shutting down (503): try again shortly. ${message}`.trim();
    case 413: return "The conversation is too large for the server (413): start a new chat.";
    default:
      if (code === "content_policy_violation") return `Refused by the server's guardrails: ${message}`;
      return `The server refused the request (${response.status}): ${message || response.statusText}`;
  }
}

function requestBody() {
  const body = {
    model: state.model,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || 256,
    messages: [...state.history],
  };
  const system = $("system-prompt").value.trim();
  if (system && !$("use-rag").checked) body.messages.unshift({ role: "system", content: system });
  return body;
}

function showSources(box, rag) {
  if (!rag || !rag.sources) return;
  let list = box.querySelector(".sources");
  if (!list) {
    box.append(element("span", "note", "Sources:"));
    list = element("ul", "sources");
    box.append(list);
  }
  list.replaceChildren();
  const cited = new Set((rag.citations || []).map((c) => c.n));
  for (const source of rag.sources) {
    const title = source.title || source.source || source.chunk_id;
    const item = element("li", cited.has(source.n) ? "cited" : "", `[${source.n}] ${title}`);
    if (source.source && source.source !== title) item.append(element("span", "muted", ` (${source.source})`));
    if (cited.has(source.n)) item.append(element("span", "muted", " - cited"));
    list.append(item);
  }
}

// Server-sent events from a fetch body: "data: {json}\n\n" ... "data: [DONE]\n\n".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  showError("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.box.setAttribute("aria-busy", "true");
  const url = $("use-rag").checked ? "/v1/rag/chat/completions" : "/v1/chat/completions";
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  state.controller = new AbortController();
  setBusy(true);
  let answer = "";
  let finish = null;
  try {
    const response = await fetch(url, { method: "POST", headers, body: JSON.stringify(requestBody()),
                                        signal: state.controller.signal });
    if (!response.ok) {
      throw new Error(await describeRefusal(response));
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(`The server stopped the answer: ${chunk.error.message || "error"}`);
      if (chunk.rag) showSources(reply.box, chunk.rag);
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        answer += piece;
        reply.body.textContent = answer;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (finish === "length") reply.box.append(element("span", "note", "(cut at max tokens)"));
    if (finish === "content_filter") reply.box.append(element("span", "note", "(stopped by the server's guardrails)"));
  } catch (error) {
    if (error.name === "AbortError") {
      reply.box.append(element("span", "note", "(stopped)"));
    } else if (error instanceof TypeError) {
      showError("Cannot reach the server: is `byollm serve` running? " + error.message);
    } else {
      showError(error.message);
    }
  } finally {
    reply.box.removeAttribute("aria-busy");
    if (answer) state.history.push({ role: "assistant", content: answer });
    else if (!reply.body.textContent) reply.box.remove();
    if (!answer) state.history.pop(); // nothing came back: the question is not part of the history
    state.controller = null;
    setBusy(false);
  }
}

async function loadConfig() {
  try {
    const response = await fetch("/ui/config.json");
    const config = await response.json();
    state.model = config.model;
    state.rag = config.rag;
    state.auth = config.auth;
    $("model-name").textContent = config.model;
    $("use-rag").disabled = !config.rag;
    $("server-state").textContent = (config.auth ? "API key required. " : "") +
      (config.rag ? "A document index is available (tick RAG)." : "No document index on this server.");
  } catch (_) {
    $("server-state").textContent = "The server does not answer: is `byollm serve` running?";
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value));
  for (const id of ["temperature", "top-p"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) state.controller.abort();
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("conversation").replaceChildren();
    showError("");
    $("prompt").focus();
  });
  loadConfig();
}

document.addEventListener("DOMContentLoaded", init);
