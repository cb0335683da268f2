// The chat page: talks to /v1/sessions, streams replies (server-sent events over fetch); rates
// replies, and regenerates the last one to pick the better of two (/v1/sessions/{id}/messages/{n}/...).
"use strict";

const $ = (id) => document.getElementById(id);
// count: the messages the server has stored for the open session (a reply's index is its position)
const state = { session: null, busy: false, abort: null, count: 0 };
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
    const when = new Date(s.updated * 1000).toLocaleString() + " · " + s.message_count + " messages";
    li.append(button(s.title || "(empty chat)", "open", when, () => openSession(s.id)),
              button("×", "delete", "Delete this conversation", () => deleteSession(s.id)));
    ul.append(li);
  }
  $("history-empty").hidden = data.data.length > 0;
}

function button(text, className, title, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.title = title;
  b.onclick = onclick;
  return b;
}

// Good/Bad on a stored reply, and "Regenerate" on the last one.
function addActions(li, index, variant, rating) {
  li.dataset.index = index;
  li.dataset.variant = variant || 0;
  const bar = document.createElement("div");
  bar.className = "actions";
  for (const [value, label, title] of [["up", "▲ Good", "Good reply"], ["down", "▼ Bad", "Bad reply"]]) {
    const b = button(label, "rate " + value, title, () => rate(li, value));
    b.setAttribute("aria-pressed", String(rating === value));
    bar.append(b);
  }
  bar.append(button("↻ Regenerate", "regenerate", "Write another reply to this turn, then pick the better of the two",
                    () => regenerate(li)));
  li.append(bar);
  markLast();
}

function markLast() {
  for (const b of document.querySelectorAll("#messages .regenerate")) {
    b.hidden = Number(b.closest("li").dataset.index) !== state.count - 1;
  }
}

function showRating(li, value) {
  for (const b of li.querySelectorAll(".rate")) b.setAttribute("aria-pressed", String(b.classList.contains(value)));
}

async function rate(li, value) {
  try {
    await api("POST", feedbackPath(li, "feedback"), { rating: value, variant: Number(li.dataset.variant) });
    showRating(li, value);
  } catch (e) {
    showError(e.message);
  }
}

function feedbackPath(li, what) {
  return "/v1/sessions/" + state.session.id + "/messages/" + li.dataset.index + "/" + what;
}

// Another reply to the last turn, shown under the first; the composer waits until one is picked.
async function regenerate(li) {
  if (state.busy) return;
  showError("");
  setBusy(true);
  const alt = addMessage("assistant", "");
  alt.classList.add("alternative", "streaming");
  li.after(alt);
  let done = null;
  try {
    done = await streamReply(feedbackPath(li, "regenerate"), decoding(), alt);
  } catch (e) {
    showError(e.name === "AbortError" ? "" : e.message);
  } finally {
    alt.classList.remove("streaming");
    state.abort = null;
  }
  if (done) {
    offerPick(li, alt, done.variant);
  } else {
    alt.remove();
    setBusy(false);
  }
}

// "This one is better" under each of the two replies (stored as a pick), or Skip.
function offerPick(li, alt, variant) {
  const shown = Number(li.dataset.variant);
  const bar = document.createElement("div");
  bar.className = "pick";
  const finish = () => {
    for (const b of document.querySelectorAll("#messages .better")) b.remove();
    alt.remove();
    bar.remove();
    $("send").disabled = false;
    setBusy(false);
    $("input").focus();
  };
  const pick = async (chosen, rejected) => {
    try {
      const r = await api("POST", feedbackPath(li, "preference"), { chosen, rejected });
      if (chosen !== shown) {  // the new reply takes the first one's place
        li.querySelector(".body").textContent = r.message.content;
        li.dataset.variant = chosen;
        li.dataset.finish = alt.dataset.finish || "";
        for (const d of li.querySelectorAll(".candidates")) d.remove();
        for (const d of alt.querySelectorAll(".candidates")) li.querySelector(".actions").before(d);
        showRating(li, null);
      }
      finish();
    } catch (e) {
      showError(e.message);
    }
  };
  li.append(button("This one is better", "better", "Keep this reply", () => pick(shown, variant)));
  alt.append(button("This one is better", "better", "Keep this reply", () => pick(variant, shown)));
  bar.append(button("Skip", "skip", "Keep the first reply without saying which is better", finish));
  alt.after(bar);
  $("stop").hidden = true;  // still busy: the composer waits for a pick or a skip
  $("send").hidden = false;
  $("send").disabled = true;
}

async function openSession(id) {
  if (state.busy) return;
  try {
    const s = await api("GET", "/v1/sessions/" + id);
    state.session = s;
    state.count = s.messages.length;
    $("messages").replaceChildren();
    s.messages.forEach((m, i) => {
      const li = addMessage(m.role, m.content);
      showCandidates(li, m.candidates);
      if (m.role === "assistant") addActions(li, i, m.variant, m.feedback && m.feedback.rating);
    });
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
  state.count = 0;
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

// POST `fields` (streamed) to a session route and show the reply in `li`; the last event (the
// reply is stored by then), or null when the stream ended without one.
async function streamReply(path, fields, li) {
  const body = li.querySelector(".body");
  let last = null;
  state.abort = new AbortController();
  const res = await fetch(path, {
    method: "POST", headers: headers(), signal: state.abort.signal,
    body: JSON.stringify({ ...fields, stream: true }),
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
      li.scrollIntoView({ block: "end" });
    }
    if (choice && choice.finish_reason) {
      li.dataset.finish = choice.finish_reason;
      last = ev;
    }
    if (ev.candidates) showCandidates(li, ev.candidates);
  });
  return last;
}

async function send(text) {
  showError("");
  setBusy(true);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  try {
    if (!state.session) {
      const persona = $("persona").value.trim();
      state.session = await api("POST", "/v1/sessions", { persona: persona || null });
      state.count = 0;
      showPersona(state.session.persona);
    }
    if (await streamReply("/v1/sessions/" + state.session.id + "/messages", { content: text, ...decoding() }, reply)) {
      state.count += 2;
      addActions(reply, state.count - 1, 0, null);
    }
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
