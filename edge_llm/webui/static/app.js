// edge-llm chat page: plain JS, no dependencies. Talks only to the server's OpenAI API:
// GET /v1/models, POST /v1/chat/completions (stream: true, read as SSE from a fetch stream).
// The conversation, the settings and the API key stay in this browser's localStorage.
"use strict";

const KEYS = { conversation: "edge-llm.conversation", settings: "edge-llm.settings", apiKey: "edge-llm.apiKey" };
const $ = (id) => document.getElementById(id);
const SETTINGS = ["model", "system", "temperature", "top-p", "max-tokens", "extra"];

let conversation = load(KEYS.conversation, []);
let controller = null; // the AbortController of the answer being streamed
let attachments = []; // data: URLs of the images for the next message

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch (_) {
    return fallback;
  }
}

function save() {
  // Images stay in this page's memory only (localStorage holds a few MB): a reloaded page keeps
  // the text of a message that had images, not the images.
  const kept = conversation.map((m) => (m.images ? { ...m, images: undefined, imageCount: m.images.length } : m));
  localStorage.setItem(KEYS.conversation, JSON.stringify(kept));
}

function saveSettings() {
  const settings = {};
  for (const id of SETTINGS) settings[id] = $(id).value;
  localStorage.setItem(KEYS.settings, JSON.stringify(settings));
  localStorage.setItem(KEYS.apiKey, $("api-key").value);
}

function setStatus(text) {
  $("status").textContent = text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function loadModels() {
  const select = $("model");
  const wanted = select.value || load(KEYS.settings, {}).model;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      setStatus(response.status === 401 ? "This server needs an API key: paste it below." : await errorText(response));
      return;
    }
    const models = (await response.json()).data.map((m) => m.id);
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(wanted)) select.value = wanted;
    setStatus(models.length + " model" + (models.length === 1 ? "" : "s") + " available");
  } catch (err) {
    setStatus("Cannot reach the server: " + err.message);
  }
}

// -- rendering ---------------------------------------------------------------------------------

function messageElement(message, index) {
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  div.dataset.index = index;
  if (message.role === "assistant") {
    div.dataset.state = message.state || "done";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = message.model || "";
    div.append(meta);
  }
  if (message.images && message.images.length) {
    const images = document.createElement("div");
    images.className = "images";
    for (const url of message.images) {
      const img = document.createElement("img");
      img.src = url; // a data: URL the user chose
      img.alt = "attached image";
      images.append(img);
    }
    div.append(images);
  } else if (message.imageCount) {
    const note = document.createElement("div");
    note.className = "meta";
    note.textContent = "(" + message.imageCount + " image" + (message.imageCount === 1 ? "" : "s") + " not kept)";
    div.append(note);
  }
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = message.content; // never innerHTML: model output is untrusted text
  div.append(text);
  if (message.error) {
    const error = document.createElement("div");
    error.className = "error";
    error.textContent = message.error;
    div.append(error);
  }
  return div;
}

function render() {
  $("messages").replaceChildren(...conversation.map(messageElement));
  scrollDown();
}

function update(index) {
  const old = $("messages").querySelector('.msg[data-index="' + index + '"]');
  if (old) old.replaceWith(messageElement(conversation[index], index));
  scrollDown();
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("model").disabled = busy;
}

// -- one exchange ----------------------------------------------------------------------------------

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conversation) {
    // A stopped answer stays in the history (as far as it got); a failed one does not.
    if (m.state === "streaming" || m.error || (m.role === "assistant" && !m.content)) continue;
    if (m.images && m.images.length) {
      // OpenAI's content parts: the images, then the text
      const parts = m.images.map((url) => ({ type: "image_url", image_url: { url } }));
      messages.push({ role: m.role, content: [...parts, { type: "text", text: m.content }] });
    } else {
      messages.push({ role: m.role, content: m.content });
    }
  }
  const body = { model: $("model").value, messages, stream: true };
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  if (number("temperature") !== undefined) body.temperature = number("temperature");
  if (number("top-p") !== undefined) body.top_p = number("top-p");
  if (number("max-tokens") !== undefined) body.max_tokens = number("max-tokens");
  const extra = $("extra").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra)); // a typo is reported by send()
  return body;
}

// Calls onData with each event's data (SSE: "data: ..." lines, events end with a blank line).
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length && onData(data.join("\n")) === false) return;
    }
    if (done) return;
  }
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  let body;
  try {
    const user = { role: "user", content: text };
    if (attachments.length) user.images = attachments;
    conversation.push(user);
    body = requestBody();
  } catch (err) {
    conversation.pop();
    setStatus("Extra request fields: " + err.message);
    return;
  }
  $("input").value = "";
  attachments = [];
  renderAttachments();
  const answer = { role: "assistant", content: "", model: body.model, state: "streaming" };
  conversation.push(answer);
  const index = conversation.length - 1;
  save();
  render();
  setBusy(true);
  controller = new AbortController();
  setStatus("Generating...");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.model) answer.model = chunk.model;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) answer.content += choice.delta.content;
        if (choice.finish_reason) answer.finish_reason = choice.finish_reason;
      }
      update(index);
      return true;
    });
    answer.state = "done";
    setStatus(answer.finish_reason === "length" ? "Stopped at the max tokens limit." : "");
  } catch (err) {
    if (err.name === "AbortError") {
      answer.state = "stopped";
      setStatus("Stopped.");
    } else {
      answer.state = "error";
      answer.error = err.message;
      setStatus("Error: " + err.message);
    }
  } finally {
    controller.abort(); // after an error or [DONE]: close the connection, the server frees the slot
    controller = null;
    setBusy(false);
    save();
    update(index);
  }
}

function stop() {
  if (controller) controller.abort();
}

// -- attached images --------------------------------------------------------------------------------

function renderAttachments() {
  $("attachments").replaceChildren(...attachments.map((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send (click to remove)";
    img.title = "click to remove";
    img.addEventListener("click", () => { attachments.splice(i, 1); renderAttachments(); });
    return img;
  }));
}

function attach(files) {
  for (const file of files) {
    const reader = new FileReader();
    reader.onload = () => { attachments.push(reader.result); renderAttachments(); };
    reader.onerror = () => setStatus("Cannot read " + file.name);
    reader.readAsDataURL(file);
  }
}

function init() {
  const settings = load(KEYS.settings, {});
  for (const id of SETTINGS) if (id !== "model" && settings[id] !== undefined) $(id).value = settings[id];
  $("api-key").value = localStorage.getItem(KEYS.apiKey) || "";
  // An answer that was streaming when the page closed will never finish.
  for (const m of conversation) if (m.state === "streaming") m.state = "stopped";
  render();
  for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => { saveSettings(); loadModels(); });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("attach").addEventListener("change", (e) => { attach(e.target.files); e.target.value = ""; });
  $("new-chat").addEventListener("click", () => {
    stop();
    conversation = [];
    save();
    render();
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
