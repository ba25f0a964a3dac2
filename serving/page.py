"""The small HTML page served at ``GET /`` to try prompts (plain HTML + fetch, no build step)."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lumina sampler</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
  label { display: block; margin: .4rem 0; }
  textarea, input[type=text], input[type=password] { width: 100%; box-sizing: border-box; }
  .row { display: flex; gap: 1rem; flex-wrap: wrap; }
  .row label { flex: 1 1 8rem; }
  #images img { margin: .5rem .5rem 0 0; border: 1px solid #ccc; image-rendering: pixelated; }
  #status { white-space: pre-wrap; font-family: monospace; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>Lumina sampler</h1>
<p><a href="/docs">API docs</a> · <a href="/v1/model" id="model-link">model info</a> ·
<a href="/metrics">metrics</a> · <span id="ready">checking readiness…</span></p>
<form id="form">
  <label>Prompts (one per line)
    <textarea id="prompt" rows="3" required>a red cat on the left of a blue car</textarea></label>
  <label>Negative prompt <input type="text" id="negative_prompt" value=""></label>
  <div class="row">
    <label>Width <input type="number" id="width" step="16" min="16" placeholder="default"></label>
    <label>Height <input type="number" id="height" step="16" min="16" placeholder="default"></label>
    <label>Steps <input type="number" id="steps" min="1" placeholder="default"></label>
    <label>Guidance <input type="number" id="guidance_scale" step="0.1" min="0" placeholder="default"></label>
    <label>Seed <input type="number" id="seed" min="0" placeholder="random"></label>
    <label>Solver
      <select id="solver"><option value="">default</option><option>euler</option>
      <option>midpoint</option><option>flow_dpm</option></select></label>
    <label>System prompt
      <select id="system_prompt"><option value="">default</option><option>A</option>
      <option>B</option><option>C</option></select></label>
  </div>
  <label>Bearer token (if the server needs one)
    <input type="password" id="token" autocomplete="off"></label>
  <button type="submit" id="go">Generate</button>
</form>
<p id="status" data-state="idle" aria-live="polite"></p>
<div id="images"></div>
<script>
const $ = (id) => document.getElementById(id);
$("token").value = localStorage.getItem("lumina-token") || "";
async function pollReady() {  // until the model is loaded
  try {
    const r = await fetch("/readyz");
    $("ready").textContent = r.ok ? "model ready" : "model loading…";
    if (r.ok) return;
  } catch (error) { $("ready").textContent = "server unreachable"; }
  setTimeout(pollReady, 2000);
}
pollReady();
fetch("/v1/model").then((r) => r.ok ? r.json() : null).then((info) => {
  const side = info && info.defaults && info.defaults.max_side;
  if (side) { for (const key of ["width", "height"]) $(key).max = side; }
}).catch(() => {});
function setState(state) { $("status").dataset.state = state; }
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompts = $("prompt").value.split("\\n").map((p) => p.trim()).filter((p) => p);
  const body = { prompt: prompts.length === 1 ? prompts[0] : prompts, response_format: "b64_json" };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const key of ["width", "height", "steps", "seed"]) {
    if ($(key).value !== "") body[key] = parseInt($(key).value, 10);
  }
  if ($("guidance_scale").value !== "") body.guidance_scale = parseFloat($("guidance_scale").value);
  for (const key of ["solver", "system_prompt"]) { if ($(key).value) body[key] = $(key).value; }
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  localStorage.setItem("lumina-token", token);
  if (token) headers["Authorization"] = "Bearer " + token;
  $("go").disabled = true;
  $("status").className = "";
  $("status").textContent = "generating…";
  setState("busy");
  const started = performance.now();
  try {
    const response = await fetch("/v1/generate", { method: "POST", headers, body: JSON.stringify(body) });
    const text = await response.text();
    let data;
    try { data = JSON.parse(text); }
    catch (error) { data = { detail: text.slice(0, 200) || response.statusText }; }  // e.g. a proxy's HTML
    if (!response.ok) throw new Error(response.status + ": " + (data.detail || JSON.stringify(data)));
    $("images").innerHTML = "";
    for (const b64 of data.images) {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + b64;
      $("images").prepend(img);
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = `seed ${data.seed} · ${seconds} s · ` + JSON.stringify(data.timings);
    setState("done");
  } catch (error) {
    $("status").className = "error";
    $("status").textContent = String(error.message || error);
    setState("error");
  } finally {
    $("go").disabled = false;
  }
});
</script>
</body>
</html>
"""
