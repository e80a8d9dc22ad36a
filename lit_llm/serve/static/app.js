// The chat page of `lit-llm serve`: keeps the conversation in memory, sends it to /v1/chat/completions with
// stream: true and shows the answer as it arrives. Plain browser JavaScript; nothing is fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // {role, content} of the conversation so far
let controller = null;       // AbortController of the answer being streamed
let modelId = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("status").textContent = "Cannot list models: " + (await errorText(response));
    return;
  }
  modelId = (await response.json()).data[0].id;
  $("model-name").textContent = modelId;
  $("status").textContent = "";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  if (!modelId) await loadModel();
  if (!modelId) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant streaming", "");
  out.dataset.chunks = "0";
  out.dataset.done = "false";
  let answer = "";
  setBusy(true);
  controller = new AbortController();
  const body = {
    model: modelId, messages: history, stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const notice = response.headers.get("X-Lit-LLM-Notice");
    $("status").textContent = notice || "";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {     // one server-sent event per blank-line-ended block
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
          if (delta) {
            answer += delta;
            out.textContent = answer;
            out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
            out.scrollIntoView({ block: "end" });
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "Stopped.";
    } else {
      addMessage("error", "Error: " + err.message);
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.done = "true";
    history.push({ role: "assistant", content: answer });
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
});
$("api-key").value = localStorage.getItem("lit_llm_api_key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("lit_llm_api_key", $("api-key").value.trim());
  loadModel();
});
loadModel();
