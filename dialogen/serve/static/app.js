// The chat page: talks to /v1/sessions, streams replies (server-sent events over fetch).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { session: null, busy: false, abort: null };
const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed", "num_candidates"];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}

function showError(msg) {
  const b = $("banner");
  b.textContent = msg;
  b.hidden = !msg;
}

// Decoding settings as request fields; empty inputs are left out (server defaults apply).
function decoding() {
  const out = {};
  for (const name of NUMBER_FIELDS) {
    const raw = $(name).value.trim();
    if (raw === "") continue;
    const v = Number(raw);
    if (name === "num_candidates" && v <= 1) continue;
    out[name] = v;
  }
  return out;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  li.append(who, body);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function showCandidates(li, candidates) {
  if (!candidates || !candidates.length) return;
  const d = document.createElement("details");
  d.className = "candidates";
  const s = document.createElement("summary");
  s.textContent = candidates.length + " candidates, best first (★ chosen)";
  const ol = document.createElement("ol");
  const ranked = [...candidates].sort((a, b) => b.score - a.score);
  for (const c of ranked) {
    const item = document.createElement("li");
    if (c.winner) item.className = "winner";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = typeof c.score === "number" ? c.score.toFixed(3) : String(c.score);
    const parts = Object.entries(c.scores || {}).filter(([k]) => k !== "score");
    score.title = parts.map(([k, v]) => k + " " + Number(v).toFixed(3)).join(", ") || "score";
    item.append(score, document.createTextNode(" " + c.text));
    ol.append(item);
  }
  d.append(s, ol);
  li.append(d);
}

function showPersona(persona) {
  const p = $("persona-shown");
  p.textContent = persona ? "Persona: " + persona : "";
  p.hidden = !persona;
}

async function refreshHistory() {
  let data;
  try {
    data = await api("GET", "/v1/sessions");
  } catch (e) {
    showError("History: " + e.message);
    return;
  }
  const ul = $("history");
  ul.replaceChildren();
  for (const s of data.data) {
    const li = document.createElement("li");
    if (state.session && s.id === state.session.id) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = s.title || "(empty chat)";
    open.title = new Date(s.updated * 1000).toLocaleString() + " · " + s.message_count + " messages";
    open.onclick = () => openSession(s.id);
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.onclick = () => deleteSession(s.id);
    li.append(open, del);
    ul.append(li);
  }
  $("history-empty").hidden = data.data.length > 0;
}

async function openSession(id) {
  if (state.busy) return;
  try {
    const s = await api("GET", "/v1/sessions/" + id);
    state.session = s;
    $("messages").replaceChildren();
    for (const m of s.messages) {
      const li = addMessage(m.role, m.content);
      showCandidates(li, m.candidates);
    }
    showPersona(s.persona);
    showError("");
    refreshHistory();
  } catch (e) {
    showError(e.message);
  }
}

async function deleteSession(id) {
  try {
    await api("DELETE", "/v1/sessions/" + id);
    if (state.session && state.session.id === id) newChat();
    refreshHistory();
  } catch (e) {
    showError(e.message);
  }
}

function newChat() {
  state.session = null;
  $("messages").replaceChildren();
  showPersona("");
  showError("");
  $("input").focus();
  refreshHistory();
}

// Read an SSE body: calls onEvent(obj) for each `data:` JSON line, stops at [DONE].
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

async function send(text) {
  showError("");
  setBusy(true);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const body = reply.querySelector(".body");
  try {
    if (!state.session) {
      const persona = $("persona").value.trim();
      state.session = await api("POST", "/v1/sessions", { persona: persona || null });
      showPersona(state.session.persona);
    }
    state.abort = new AbortController();
    const res = await fetch("/v1/sessions/" + state.session.id + "/messages", {
      method: "POST", headers: headers(), signal: state.abort.signal,
      body: JSON.stringify({ content: text, stream: true, ...decoding() }),
    });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
    }
    await readEvents(res, (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      const choice = ev.choices && ev.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        body.textContent += choice.delta.content;
        reply.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) reply.dataset.finish = choice.finish_reason;
      if (ev.candidates) showCandidates(reply, ev.candidates);
    });
    refreshHistory();
  } catch (e) {
    if (e.name === "AbortError") {
      reply.dataset.finish = "stopped";
    } else {
      showError(e.message);
      reply.remove();
    }
  } finally {
    reply.classList.remove("streaming");
    state.abort = null;
    setBusy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.busy) return;
  $("input").value = "";
  addMessage("user", text);
  send(text);
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").onclick = () => state.abort && state.abort.abort();
$("new-chat").onclick = newChat;

$("api-key").value = localStorage.getItem("dialogen-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("dialogen-api-key", $("api-key").value.trim());
  refreshHistory();
  loadModel();
});

async function loadModel() {
  try {
    const m = await api("GET", "/v1/models");
    $("model-name").textContent = m.data[0].id;
  } catch (e) {
    $("model-name").textContent = "";
  }
  // empty fields mean "server default": show the defaults as placeholders
  const res = await fetch("/health");
  const defaults = res.ok ? (await res.json()).defaults || {} : {};
  for (const name of NUMBER_FIELDS) {
    const v = defaults[name];
    $(name).placeholder = v === null || v === undefined ? (name === "seed" ? "random" : "") : String(v);
  }
  $("num_candidates").placeholder = "1";
}

loadModel();
refreshHistory();
