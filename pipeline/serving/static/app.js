// The browser page of `ovsam serve`: open an image, click or drag to segment, find classes by name (where the
// server has a detector), keep masks, download COCO JSON.
"use strict";

const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const COLORS = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]];
const $ = (id) => document.getElementById(id);
const view = $("view");
const ctx = view.getContext("2d");

const state = {
  images: [],        // every image of the session: {file_name, width, height, image_id, instances: []}
  image: null,       // the current one
  bitmap: null,
  vocabulary: "default",
  prompts: {points: [], box: null},
  answer: null,      // the latest answer for the current prompts: the API's JSON plus a decoded mask
  history: [],       // undo stack: {prompts, answer}
  drag: null,
  segments: 0,
  detector: undefined,  // the server's detector (GET /healthz), or null: the Find box is disabled
  detecting: false,
  inflight: 0,
  seq: 0,
};

// ----------------------------------------------------------------------------------------------- COCO RLE
function rleCounts(s) {
  // pycocotools' compressed counts: 6-bit groups (5 data bits + continuation) offset by 48, each count from the
  // third on stored as the difference to the one two before.
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function decodeRle(rle) {
  // A COCO RLE (column-major runs, starting with zeros) as a row-major Uint8Array of 0/1.
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  const out = new Uint8Array(h * w);
  let i = 0, value = 0;
  for (const n of counts) {
    if (value) {
      for (let j = i; j < i + n; j++) out[(j % h) * w + Math.floor(j / h)] = 1;
    }
    i += n;
    value ^= 1;
  }
  return out;
}

function maskCanvas(mask, w, h, rgb, alpha) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const g = c.getContext("2d");
  const img = g.createImageData(w, h);
  const d = img.data;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    // the outline (a pixel with an unmasked 4-neighbour) is opaque, the inside translucent
    const x = i % w, y = (i - x) / w;
    const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] ||
                 !mask[i - w] || !mask[i + w];
    d[4 * i] = rgb[0]; d[4 * i + 1] = rgb[1]; d[4 * i + 2] = rgb[2]; d[4 * i + 3] = edge ? 255 : alpha;
  }
  g.putImageData(img, 0, 0);
  return c;
}

// ------------------------------------------------------------------------------------------------ network
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(path, options) {
  const t0 = performance.now();
  state.inflight++;
  try {
    const res = await fetch(BASE + path, Object.assign({}, options, {headers: headers(options && options.headers)}));
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const e = body.error || {};
      if (res.status === 401) $("token").focus();
      throw new Error(`${res.status} ${e.code || ""}: ${e.message || res.statusText}` +
                      (e.field ? ` (field ${e.field})` : ""));
    }
    body._ms = performance.now() - t0;
    return body;
  } finally {
    state.inflight--;
  }
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = String(err.message || err);
}

// ----------------------------------------------------------------------------------------------- drawing
function draw() {
  const im = state.image;
  if (!im || !state.bitmap) return;
  ctx.clearRect(0, 0, view.width, view.height);
  ctx.drawImage(state.bitmap, 0, 0, im.width, im.height);
  for (const inst of im.instances) ctx.drawImage(inst.canvas, 0, 0);
  if (state.answer) ctx.drawImage(state.answer.canvas, 0, 0);
  const r = Math.max(3, Math.round(Math.max(im.width, im.height) / 160));
  const box = state.drag && state.drag.moved ? state.drag.box : state.prompts.box;
  if (box) {
    ctx.lineWidth = Math.max(1, r / 2);
    ctx.strokeStyle = "#1f6feb";
    ctx.setLineDash([2 * r, r]);
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.setLineDash([]);
  }
  for (const [x, y, label] of state.prompts.points) {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#2da44e" : "#cf222e";
    ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

function renderAnswer() {
  const a = state.answer;
  $("mask-label").textContent = a ? `${a.label} ${(100 * a.label_score).toFixed(1)}%` : "no mask yet";
  const topk = $("topk");
  topk.replaceChildren();
  for (const [name, score] of a ? a.topk : []) {
    const li = document.createElement("li");
    li.textContent = name;
    const s = document.createElement("span");
    s.textContent = (100 * score).toFixed(1) + "%";
    li.appendChild(s);
    topk.appendChild(li);
  }
  $("latency").textContent = a ? `${a._ms.toFixed(0)} ms · mask quality ${a.mask_quality.toFixed(2)} · ` +
                                 `${a.area} px` : "";
  $("accept").disabled = !a;
  $("clear").disabled = !hasPrompts();
  $("undo").disabled = !(state.history.length || (state.image && state.image.instances.length));
  $("everything").disabled = !state.image;
  renderFind();
  document.body.dataset.maskPixels = a ? String(a.area) : "0";
  draw();
}

function renderInstances() {
  const all = state.images.reduce((n, im) => n + im.instances.length, 0);
  $("count").textContent = String(all);
  $("download").disabled = all === 0;
  const list = $("instances");
  list.replaceChildren();
  if (!state.image) return;
  state.image.instances.forEach((inst, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${inst.color.join(",")})`;
    li.appendChild(sw);
    li.appendChild(document.createTextNode(`${inst.label} ${(100 * inst.label_score).toFixed(0)}%`));
    if (inst.detector_label !== undefined) {  // found by the detector: its own name and score beside OV-SAM's
      const found = document.createElement("span");
      found.className = "found";
      found.textContent = ` · found as ${inst.detector_label} ${(100 * inst.detector_score).toFixed(0)}%`;
      li.appendChild(found);
      li.dataset.source = "detect";
    }
    const del = document.createElement("button");
    del.textContent = "×";
    del.title = "remove";
    del.onclick = () => { state.image.instances.splice(i, 1); renderInstances(); renderAnswer(); };
    li.appendChild(del);
    list.appendChild(li);
  });
  document.body.dataset.instances = String(all);
}

// ------------------------------------------------------------------------------------------------ actions
function hasPrompts() {
  return state.prompts.points.length > 0 || state.prompts.box !== null;
}

function clonePrompts(p) {
  return {points: p.points.map((q) => q.slice()), box: p.box ? p.box.slice() : null};
}

async function segment() {
  const im = state.image;
  if (!im || !hasPrompts()) return;
  const seq = ++state.seq;
  const body = {top_k: 5, vocabulary: state.vocabulary};
  if (state.prompts.points.length) body.points = state.prompts.points;
  if (state.prompts.box) body.box = state.prompts.box;
  if (state.answer) body.previous = state.answer.previous_id;
  try {
    const a = await api(`v1/images/${im.image_id}/segment`, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (seq !== state.seq || im !== state.image) return;  // a newer prompt or image took over
    a.maskData = decodeRle(a.mask);
    a.canvas = maskCanvas(a.maskData, im.width, im.height, [31, 111, 235], 110);
    state.answer = a;
    state.segments++;
    document.body.dataset.segments = String(state.segments);
    showError(null);
  } catch (err) {
    if (seq === state.seq) showError(err);
  }
  renderAnswer();
}

function pushHistory() {
  state.history.push({prompts: clonePrompts(state.prompts), answer: state.answer});
}

function addPoint(x, y, label) {
  pushHistory();
  state.prompts.points.push([x, y, label]);
  draw();
  segment();
}

function setBox(box) {
  pushHistory();
  state.prompts.box = box;
  draw();
  segment();
}

function undo() {
  if (state.history.length) {
    const h = state.history.pop();
    state.seq++;
    state.prompts = h.prompts;
    state.answer = h.answer;
  } else if (state.image && state.image.instances.length) {
    state.image.instances.pop();
    renderInstances();
  }
  renderAnswer();
}

function clearPrompts() {
  state.seq++;
  state.prompts = {points: [], box: null};
  state.answer = null;
  state.history = [];
  renderAnswer();
}

function accept() {
  const a = state.answer;
  if (!a || !state.image) return;
  const color = COLORS[state.image.instances.length % COLORS.length];
  state.image.instances.push({label: a.label, label_score: a.label_score, mask: a.mask, box: a.box, area: a.area,
                              mask_quality: a.mask_quality,
                              canvas: maskCanvas(a.maskData, state.image.width, state.image.height, color, 90),
                              color});
  clearPrompts();
  renderInstances();
}

async function everything() {
  const im = state.image;
  if (!im) return;
  $("everything").disabled = true;
  try {
    const out = await api(`v1/images/${im.image_id}/everything`, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({vocabulary: state.vocabulary, top_k: 5})});
    if (im !== state.image) return;
    addInstances(im, out.instances);
    showError(null);
    $("latency").textContent = `everything: ${out.instances.length} masks in ${out._ms.toFixed(0)} ms`;
  } catch (err) {
    showError(err);
  }
  renderInstances();
  renderAnswer();
}

function addInstances(im, instances) {
  // Answers of "everything" and "detect": each instance kept with its mask drawn in the next colour.
  for (const inst of instances) {
    const color = COLORS[im.instances.length % COLORS.length];
    im.instances.push(Object.assign(inst, {canvas: maskCanvas(decodeRle(inst.mask), im.width, im.height, color, 90),
                                           color}));
  }
}

function renderFind() {
  const on = Boolean(state.detector);
  $("find-text").disabled = !on;
  $("detect").disabled = !on || !state.image || state.detecting;
  $("find-note").hidden = on || state.detector === undefined;  // no note before /healthz has answered
  $("find-text").title = on ? `${state.detector.name}: boxes scoring above ${state.detector.score_thresh}` : "";
}

async function detect() {
  // Every instance of the typed classes: the server's detector finds the boxes, OV-SAM segments and names them.
  const im = state.image;
  if (!im || !state.detector) return;
  const text = $("find-text").value.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  if (!text.length) { showError(new Error("type the class names to find, separated by commas")); return; }
  state.detecting = true;
  renderFind();
  try {
    const out = await api(`v1/images/${im.image_id}/detect`, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({text, top_k: 5})});
    if (im !== state.image) return;
    addInstances(im, out.instances);
    showError(null);
    $("latency").textContent = out.instances.length
      ? `detect: ${out.instances.length} instance(s) of ${out.text.join(", ")} in ${out._ms.toFixed(0)} ms`
      : `detect: nothing scored above ${out.detector_score_thresh} for ${out.text.join(", ")}`;
    document.body.dataset.detected = String(out.instances.length);
  } catch (err) {
    showError(err);
  } finally {
    state.detecting = false;
  }
  renderInstances();
  renderAnswer();
}

async function loadServerInfo() {
  // GET /healthz (open, no token) says whether the server has a detector for the Find box.
  try {
    const res = await fetch(BASE + "healthz");
    state.detector = res.ok ? ((await res.json()).detector || null) : null;
  } catch (err) {
    state.detector = null;
  }
  renderFind();
  document.body.dataset.detector = state.detector ? state.detector.name : "none";
}

async function openFile(file) {
  if (!file) return;
  showError(null);
  $("drop").textContent = `Uploading ${file.name}…`;
  try {
    const [info, bitmap] = await Promise.all([
      api("v1/images", {method: "POST", headers: {"Content-Type": file.type || "application/octet-stream"},
                        body: file}),
      createImageBitmap(file, {imageOrientation: "from-image"}),
    ]);
    const im = {file_name: file.name, width: info.width, height: info.height, image_id: info.image_id,
                instances: []};
    state.images.push(im);
    state.image = im;
    state.bitmap = bitmap;
    view.width = im.width;
    view.height = im.height;
    view.hidden = false;
    $("drop").hidden = true;
    clearPrompts();
    renderInstances();
    $("latency").textContent = `${im.width}×${im.height}, embedded in ${info._ms.toFixed(0)} ms`;
    document.body.dataset.imageId = im.image_id;
  } catch (err) {
    $("drop").textContent = "Drop an image here, or open one.";
    showError(err);
  }
}

async function chooseVocabulary() {
  const value = $("vocabulary").value;
  try {
    if (value.startsWith("builtin:")) {
      const out = await api("v1/vocabularies", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify({builtin: value.slice(8)})});
      state.vocabulary = out.vocabulary_id;
    } else {
      state.vocabulary = value;
    }
    showError(null);
  } catch (err) {
    showError(err);
    return;
  }
  if (hasPrompts()) { state.answer = null; segment(); }
}

async function addNames() {
  const names = $("vocab-names").value.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  if (!names.length) { showError(new Error("type class names, separated by commas")); return; }
  try {
    const out = await api("v1/vocabularies", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({names})});
    let opt = [...$("vocabulary").options].find((o) => o.value === out.vocabulary_id);
    if (!opt) {
      opt = new Option(`${names.slice(0, 3).join(", ")}${names.length > 3 ? "…" : ""} (${names.length})`,
                       out.vocabulary_id);
      $("vocabulary").add(opt);
    }
    $("vocabulary").value = out.vocabulary_id;
    await chooseVocabulary();
  } catch (err) {
    showError(err);
  }
}

function downloadCoco() {
  // One COCO file for the session: every opened image with the masks kept on it.
  const categories = new Map();
  const images = [], annotations = [];
  state.images.forEach((im, i) => {
    if (!im.instances.length) return;
    images.push({id: i + 1, file_name: im.file_name, width: im.width, height: im.height});
    for (const inst of im.instances) {
      if (!categories.has(inst.label)) categories.set(inst.label, categories.size + 1);
      const [x0, y0, x1, y1] = inst.box;
      annotations.push({id: annotations.length + 1, image_id: i + 1, category_id: categories.get(inst.label),
                        segmentation: inst.mask, area: inst.area, bbox: [x0, y0, x1 - x0, y1 - y0], iscrowd: 0,
                        score: inst.label_score, mask_quality: inst.mask_quality});
    }
  });
  const coco = {info: {description: "ovsam serve session", date_created: new Date().toISOString()}, images,
                annotations, categories: [...categories].map(([name, id]) => ({id, name}))};
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(coco)], {type: "application/json"}));
  a.download = "ovsam_annotations.json";
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// ------------------------------------------------------------------------------------------------- events
function imagePoint(e) {
  const r = view.getBoundingClientRect();
  const x = (e.clientX - r.left) * view.width / r.width;
  const y = (e.clientY - r.top) * view.height / r.height;
  return [Math.min(Math.max(x, 0), view.width - 1e-3), Math.min(Math.max(y, 0), view.height - 1e-3)];
}

view.addEventListener("contextmenu", (e) => e.preventDefault());
view.addEventListener("mousedown", (e) => {
  if (!state.image) return;
  e.preventDefault();
  state.drag = {start: imagePoint(e), button: e.button, moved: false, box: null};
});
window.addEventListener("mousemove", (e) => {
  const d = state.drag;
  if (!d || d.button !== 0) return;
  const [x, y] = imagePoint(e);
  const r = view.getBoundingClientRect();
  const px = Math.hypot((x - d.start[0]) * r.width / view.width, (y - d.start[1]) * r.height / view.height);
  if (px > 5) d.moved = true;
  if (d.moved) {
    d.box = [Math.min(d.start[0], x), Math.min(d.start[1], y), Math.max(d.start[0], x), Math.max(d.start[1], y)];
    draw();
  }
});
window.addEventListener("mouseup", (e) => {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  if (d.moved && d.box) setBox(d.box);
  else if (e.target === view) addPoint(d.start[0], d.start[1], d.button === 2 ? 0 : 1);
});
window.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement) return;
  if (e.key === "Enter") { e.preventDefault(); accept(); }
  else if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
  else if (e.key === "Escape") clearPrompts();
});

$("file").addEventListener("change", (e) => openFile(e.target.files[0]));
const stage = $("stage");
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragging");
  openFile(e.dataTransfer.files[0]);
});
$("accept").onclick = accept;
$("undo").onclick = undo;
$("clear").onclick = clearPrompts;
$("everything").onclick = everything;
$("download").onclick = downloadCoco;
$("vocabulary").addEventListener("change", chooseVocabulary);
$("vocab-add").onclick = addNames;
$("find").addEventListener("submit", (e) => { e.preventDefault(); detect(); });
$("token").value = sessionStorage.getItem("ovsam-token") || "";
$("token").addEventListener("change", () => sessionStorage.setItem("ovsam-token", $("token").value.trim()));

renderAnswer();
document.body.dataset.segments = "0";
loadServerInfo().finally(() => { document.body.dataset.ready = "1"; });
