// The aetrain web page: the caller's jobs, one job's stages, live curves, pictures and
// interpolation, and a submit form. It only calls the /v1 API, as any client does.
//
// Every call goes through fetch() with the key from sessionStorage as a bearer token: an
// <img src> or an EventSource cannot send that header, so pictures are fetched as blobs and
// the event stream is read from fetch()'s body.
"use strict";

const KEY_STORAGE = "aetrain.apiKey";
const LIST_POLL_MS = 2000;
const LIST_PAGE = 50; // jobs listed at first, and added by each "more"; the API gives 200 a call
const API_PAGE_MAX = 200;
const RECONNECT_MS = 2000;
const PICTURES = ["curves.png", "reconstructions.png", "latent.png"];
const EXAMPLE_SPEC = `kind: autoencoder
name: digits-dense
data: {dataset: digits, validation_fraction: 0.2, seed: 0}
model: {arch: dense, hidden: [128], latent_dim: 16, activation: relu}
objective: {loss: mse}
training: {epochs: 30, batch_size: 128, lr: 0.001, seed: 0, checkpoint_every: 5}
resources: {workers: 1}
`;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// -- calls to the API --------------------------------------------------------------------------
function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (response.ok) return response;
  let detail = `HTTP ${response.status}`;
  try {
    detail = (await response.json()).detail ?? detail;
  } catch { /* not JSON: keep the status */ }
  if (response.status === 401) askForKey(sessionStorage.getItem(KEY_STORAGE) ? detail : "");
  throw new ApiError(response.status, detail);
}

const getJson = async (path) => (await call(path)).json();

function showBanner(message) {
  $("banner").textContent = message;
  $("banner").hidden = !message;
}

// -- the API key -------------------------------------------------------------------------------
function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key-forget").hidden = true;
}

function setUpKey() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    $("key-forget").hidden = false;
    refreshJobs();
    if (state.jobId) selectJob(state.jobId);
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    location.reload();
  });
  $("key-forget").hidden = !sessionStorage.getItem(KEY_STORAGE);
}

// -- the job list, polled ----------------------------------------------------------------------
const state = {
  jobId: null, job: null, stream: null, series: {}, interpTimer: null, listed: LIST_PAGE,
};

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  return td;
}

function stateBadge(value) {
  const td = cell(value);
  td.className = `state state-${value}`;
  return td;
}

// The newest `state.listed` jobs, page after page (the API's cursor); whether there are more.
async function listedJobs() {
  const items = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({
      limit: String(Math.min(API_PAGE_MAX, state.listed - items.length)),
    });
    if (cursor) query.set("cursor", cursor);
    const page = await getJson(`/v1/jobs?${query}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < state.listed);
  return { items, more: Boolean(cursor) };
}

async function refreshJobs() {
  try {
    const page = await listedJobs();
    $("jobs-more").hidden = !page.more;
    const body = $("jobs").tBodies[0];
    body.replaceChildren(...page.items.map((job) => {
      const tr = document.createElement("tr");
      tr.dataset.jobId = job.id;
      tr.tabIndex = 0;
      tr.className = job.id === state.jobId ? "selected" : "";
      tr.append(cell(job.name), cell(job.kind), stateBadge(job.state),
                cell(job.epoch === null ? "" : job.epoch + 1),
                cell(new Date(job.created_at).toLocaleString()));
      return tr;
    }));
    $("jobs-empty").hidden = page.items.length > 0;
    showBanner("");
    const selected = page.items.find((job) => job.id === state.jobId);
    if (selected && selected.state !== state.job?.state) showJob(selected);
  } catch (err) {
    if (err.status !== 401) showBanner(`Jobs: ${err.message}`);
  }
}

function pollJobs() {
  refreshJobs().finally(() => setTimeout(pollJobs, LIST_POLL_MS));
}

function setUpList() {
  const open = (event) => {
    const row = event.target.closest("tr[data-job-id]");
    if (row) selectJob(row.dataset.jobId);
  };
  $("jobs").addEventListener("click", open);
  $("jobs").addEventListener("keydown", (event) => { if (event.key === "Enter") open(event); });
  $("jobs-more").addEventListener("click", () => {
    state.listed += LIST_PAGE;
    refreshJobs();
  });
}

// -- one job -----------------------------------------------------------------------------------
const isActive = (jobState) => jobState === "queued" || jobState === "running";

async function selectJob(jobId) {
  state.stream?.abort();
  state.jobId = jobId;
  state.job = null;
  state.series = {};
  for (const row of $("jobs").tBodies[0].rows) {
    row.className = row.dataset.jobId === jobId ? "selected" : "";
  }
  $("curves").replaceChildren();
  $("pictures").replaceChildren();
  $("interpolation").hidden = true;
  $("job").hidden = false;
  try {
    showJob(await getJson(`/v1/jobs/${jobId}`));
  } catch (err) {
    showBanner(`Job ${jobId}: ${err.message}`);
    return;
  }
  state.stream = new AbortController();
  followEvents(jobId, state.stream.signal);
}

function showJob(job) {
  const before = state.job;
  state.job = job;
  $("job-name").textContent = job.name;
  $("job-id").textContent = job.id;
  $("job-state").textContent = job.state;
  $("job-state").className = `state state-${job.state}`;
  $("job-error").textContent = job.error ?? "";
  $("job-error").hidden = !job.error;
  $("cancel").disabled = !isActive(job.state);
  $("download-encoder").disabled = job.state !== "succeeded";
  showStages(job.stages);
  if (job.state === "succeeded" && before?.state !== "succeeded") showResult(job.id);
}

function showStages(stages) {
  $("stages").tBodies[0].replaceChildren(...stages.map((stage) => {
    const tr = document.createElement("tr");
    tr.dataset.stage = stage.name;
    const points = state.series[stage.name] ?? [];
    const latest = points.length ? points[points.length - 1].metrics : stage.metrics ?? {};
    tr.append(cell(stage.name), stateBadge(stage.state),
              cell(stage.epoch === null || stage.epoch === undefined ? "" : stage.epoch + 1),
              cell(formatMetrics(latest)));
    return tr;
  }));
}

function formatMetrics(metrics) {
  return Object.entries(metrics ?? {})
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${v.toPrecision(4)}`)
    .join(", ");
}

// -- the event stream: fetch() and a reader, since EventSource cannot send the key ------------
async function followEvents(jobId, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const headers = lastId ? { "Last-Event-ID": lastId } : {};
      const response = await call(`/v1/jobs/${jobId}/events`, { headers, signal });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.id) lastId = event.id;
          if (onEvent(jobId, event)) return;  // `end`: the job is over
        }
      }
    } catch (err) {
      if (signal.aborted || err.status === 401 || err.status === 404) return;
    }
    // The stream closed early (an API restart, a proxy, 429): resume where it stopped.
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

function parseEvent(block) {
  const event = { kind: "message", data: "", id: null };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event.kind = value;
    else if (field === "data") event.data += value;
    else if (field === "id") event.id = value;
  }
  return event;
}

function onEvent(jobId, event) {
  if (jobId !== state.jobId || !event.data) return false;
  const data = JSON.parse(event.data);
  if (event.kind === "epoch") {
    addEpoch(data);
  } else if (event.kind === "state" && state.job) {
    const stages = state.job.stages.map((stage) => {
      const now = data.stages.find((s) => s.name === stage.name);
      return now ? { ...stage, state: now.state, epoch: now.epoch } : stage;
    });
    showJob({ ...state.job, state: data.state, error: data.error, stages });
  } else if (event.kind === "end") {
    // The record has what the stream does not carry: final metrics, timestamps.
    getJson(`/v1/jobs/${jobId}`).then(showJob).catch(() => {});
    return true;
  }
  return false;
}

function addEpoch({ stage, epoch, metrics }) {
  // A resumed run reports its epochs again from its checkpoint: the new values replace them.
  const points = (state.series[stage] ?? []).filter((p) => p.epoch < epoch);
  points.push({ epoch, metrics });
  state.series[stage] = points;
  scheduleDraw(stage);
}

// -- curves on a canvas ------------------------------------------------------------------------
const pendingDraws = new Set();

function scheduleDraw(stage) {
  if (pendingDraws.size === 0) {
    requestAnimationFrame(() => {
      for (const name of pendingDraws) drawCurves(name);
      pendingDraws.clear();
      if (state.job) showStages(state.job.stages);
    });
  }
  pendingDraws.add(stage);
}

function curveKeys(points) {
  // What curves.png draws: train_loss, then every val_* metric; accuracies have another scale.
  const keys = new Set();
  for (const { metrics } of points) {
    for (const key of Object.keys(metrics)) {
      if ((key === "train_loss" || key.startsWith("val_")) && !key.endsWith("accuracy")) {
        keys.add(key);
      }
    }
  }
  return [...keys].sort((a, b) => (a === "train_loss" ? -1 : b === "train_loss" ? 1 : 0));
}

function canvasFor(stage) {
  let figure = $("curves").querySelector(`figure[data-stage="${CSS.escape(stage)}"]`);
  if (!figure) {
    figure = document.createElement("figure");
    figure.dataset.stage = stage;
    const canvas = document.createElement("canvas");
    canvas.width = 480;
    canvas.height = 240;
    const caption = document.createElement("figcaption");
    figure.append(canvas, caption);
    $("curves").append(figure);
  }
  return figure;
}

function drawCurves(stage) {
  const points = state.series[stage] ?? [];
  const figure = canvasFor(stage);
  const canvas = figure.querySelector("canvas");
  const keys = curveKeys(points);
  const values = keys.flatMap((k) => points.map((p) => p.metrics[k]))
    .filter((v) => typeof v === "number" && Number.isFinite(v));
  figure.dataset.epochs = String(points.length);
  const ctx = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const pad = { left: 56, right: 12, top: 12, bottom: 28 };
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  ctx.strokeStyle = "#888";
  ctx.strokeRect(pad.left, pad.top, W - pad.left - pad.right, H - pad.top - pad.bottom);
  if (values.length === 0) return;
  // Logarithmic where the values span a decade or more, as in curves.png.
  const positive = values.every((v) => v > 0);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const log = positive && hi / lo >= 10;
  const t = log ? Math.log10 : (v) => v;
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const [tLo, tHi] = [t(lo), t(hi)];
  const epochs = points.map((p) => p.epoch);
  const [eLo, eHi] = [Math.min(...epochs), Math.max(Math.max(...epochs), Math.min(...epochs) + 1)];
  const x = (e) => pad.left + ((e - eLo) / (eHi - eLo)) * (W - pad.left - pad.right);
  const y = (v) => H - pad.bottom - ((t(v) - tLo) / (tHi - tLo)) * (H - pad.top - pad.bottom);

  ctx.fillStyle = "#333";
  ctx.font = "11px sans-serif";
  ctx.textAlign = "right";
  ctx.fillText(hi.toPrecision(3), pad.left - 4, pad.top + 8);
  ctx.fillText(lo.toPrecision(3), pad.left - 4, H - pad.bottom);
  ctx.textAlign = "center";
  ctx.fillText(`epoch ${eLo + 1}`, pad.left + 20, H - 8);
  ctx.fillText(`${eHi + 1}`, W - pad.right - 8, H - 8);
  ctx.fillText(log ? "log scale" : "", W / 2, H - 8);

  keys.forEach((key, i) => {
    ctx.strokeStyle = ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    for (const p of points) {
      const v = p.metrics[key];
      if (typeof v !== "number" || !Number.isFinite(v) || (log && v <= 0)) continue;
      if (started) ctx.lineTo(x(p.epoch), y(v));
      else ctx.moveTo(x(p.epoch), y(v));
      started = true;
      ctx.fillRect(x(p.epoch) - 2, y(v) - 2, 4, 4);
    }
    ctx.stroke();
  });
  const caption = figure.querySelector("figcaption");
  caption.replaceChildren(`${stage}: `, ...keys.flatMap((key, i) => {
    const span = document.createElement("span");
    span.style.color = COLORS[i % COLORS.length];
    span.textContent = `■ ${key} `;
    return [span];
  }));
}

// -- pictures, interpolation, downloads -------------------------------------------------------
async function blobUrl(path, options) {
  return URL.createObjectURL(await (await call(path, options)).blob());
}

async function showResult(jobId) {
  let result;
  try {
    result = await getJson(`/v1/jobs/${jobId}/result`);
  } catch (err) {
    showBanner(`Result: ${err.message}`);
    return;
  }
  if (jobId !== state.jobId) return;
  const pictures = [];
  for (const name of PICTURES.filter((n) => result.artifacts.includes(n))) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = name;
    img.dataset.artifact = name;
    const caption = document.createElement("figcaption");
    caption.textContent = name;
    figure.append(img, caption);
    pictures.push(figure);
    blobUrl(`/v1/jobs/${jobId}/artifacts/${name}`).then((url) => { img.src = url; })
      .catch((err) => { caption.textContent = `${name}: ${err.message}`; });
  }
  $("pictures").replaceChildren(...pictures);
  if (result.artifacts.includes("val_codes.npy")) setUpInterpolation(jobId);
}

// The number of validation samples: the shape in val_codes.npy's header (its first bytes).
async function validationSize(jobId) {
  const response = await call(`/v1/jobs/${jobId}/artifacts/val_codes.npy`,
                              { headers: { Range: "bytes=0-511" } });
  const head = new TextDecoder("latin1").decode(await response.arrayBuffer());
  const match = head.match(/'shape':\s*\((\d+)/);
  return match ? Number(match[1]) : 1;
}

async function setUpInterpolation(jobId) {
  let n;
  try {
    n = await validationSize(jobId);
  } catch {
    return;
  }
  if (jobId !== state.jobId) return;
  for (const id of ["interp-a", "interp-b"]) $(id).max = String(Math.max(0, n - 1));
  $("interp-b").value = String(Math.min(1, n - 1));
  $("interpolation").hidden = false;
  interpolate();
}

function interpolate() {
  for (const id of ["interp-a", "interp-b", "interp-steps"]) $(`${id}-out`).value = $(id).value;
  clearTimeout(state.interpTimer);
  state.interpTimer = setTimeout(async () => {
    const jobId = state.jobId;
    const body = JSON.stringify({
      a: Number($("interp-a").value), b: Number($("interp-b").value),
      steps: Number($("interp-steps").value),
    });
    try {
      const url = await blobUrl(`/v1/jobs/${jobId}/interpolate?format=png`, {
        method: "POST", body, headers: { "Content-Type": "application/json" },
      });
      if (jobId !== state.jobId) return;
      const img = $("interp-strip");
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = url;
      img.dataset.request = body;  // what it shows, for a reader (and a test) to check
      $("interp-error").hidden = true;
    } catch (err) {
      $("interp-error").textContent = describe(err.detail);
      $("interp-error").hidden = false;
    }
  }, 150);  // sliders fire on every step of a drag: one request once it rests
}

async function cancelJob() {
  const jobId = state.jobId;
  $("cancel").disabled = true;
  try {
    showJob(await (await call(`/v1/jobs/${jobId}/cancel`, { method: "POST" })).json());
    refreshJobs();
  } catch (err) {
    showBanner(`Cancel: ${err.message}`);
    $("cancel").disabled = !isActive(state.job?.state);
  }
}

async function downloadEncoder() {
  const jobId = state.jobId;
  const format = $("encoder-format").value;
  try {
    const response = await call(`/v1/jobs/${jobId}/encoder?format=${format}`);
    const disposition = response.headers.get("Content-Disposition") ?? "";
    const name = disposition.match(/filename="?([^";]+)"?/)?.[1] ?? `${jobId}-encoder`;
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (err) {
    showBanner(`Encoder: ${err.message}`);
  }
}

// -- the submit form ---------------------------------------------------------------------------
function describe(detail) {
  if (!Array.isArray(detail)) return String(detail ?? "");
  return detail.map((e) => `${e.field ?? (e.loc ?? []).join(".")}: ${e.msg}`).join("; ");
}

// The line of the spec text that sets `field` (a dotted path), to point at it: each key of
// the path is looked for from the line of the one before, so `head.epochs` is not taken for
// `training.epochs`. Null when the field is not written (a required one that is missing).
function lineOf(text, field) {
  const lines = text.split("\n");
  let at = -1;
  for (const key of String(field).split(".").filter((p) => !/^\d+$/.test(p))) {
    const escaped = key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const pattern = new RegExp(`(^|[\\s{,])["']?${escaped}["']?\\s*:`);
    const found = lines.findIndex((line, i) => i >= Math.max(at, 0) && pattern.test(line));
    if (found < 0) return null;
    at = found;
  }
  return at < 0 ? null : at + 1;
}

function showSpecErrors(errors) {
  const text = $("spec").value;
  $("spec-errors").replaceChildren(...errors.map(({ field, msg, line }) => {
    const li = document.createElement("li");
    li.dataset.field = field ?? "";
    const at = line ?? (field ? lineOf(text, field) : null);
    if (field) {
      const code = document.createElement("code");
      code.textContent = field;
      li.append(code, " ");
    }
    li.append(at ? `(line ${at}) ${msg}` : msg);
    if (at) li.addEventListener("click", () => selectLine(at));
    return li;
  }));
  $("spec").classList.toggle("invalid", errors.length > 0);
}

function selectLine(line) {
  const area = $("spec");
  const lines = area.value.split("\n");
  const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
  area.focus();
  area.setSelectionRange(start, start + lines[line - 1].length);
}

async function submitSpec(event) {
  event.preventDefault();
  let spec;
  try {
    spec = window.parseSpecText($("spec").value);
  } catch (err) {
    showSpecErrors([{ field: null, msg: err.reason ?? err.message, line: err.line || null }]);
    return;
  }
  try {
    const response = await call("/v1/jobs", {
      method: "POST", body: JSON.stringify(spec), headers: { "Content-Type": "application/json" },
    });
    const job = await response.json();
    showSpecErrors([]);
    await refreshJobs();
    selectJob(job.id);
  } catch (err) {
    if (err.status === 422 && Array.isArray(err.detail)) {
      showSpecErrors(err.detail.map((e) => ({
        field: e.field ?? (e.loc ?? []).filter((p) => p !== "body").join("."), msg: e.msg,
      })));
    } else {
      showSpecErrors([{ field: null, msg: err.message }]);
    }
  }
}

// -- start -------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  setUpKey();
  setUpList();
  $("spec").value = EXAMPLE_SPEC;
  $("submit-form").addEventListener("submit", submitSpec);
  $("cancel").addEventListener("click", cancelJob);
  $("download-encoder").addEventListener("click", downloadEncoder);
  for (const id of ["interp-a", "interp-b", "interp-steps"]) {
    $(id).addEventListener("input", interpolate);
  }
  const jobFromUrl = new URLSearchParams(location.search).get("job");
  if (jobFromUrl) selectJob(jobFromUrl);
  pollJobs();
});
