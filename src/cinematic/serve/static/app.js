// The cinematic web page: a form that POSTs /v1/videos, and a gallery of job cards kept live by polling.
// Plain JavaScript served as is (no build step). Text from the server is only ever set with textContent.
"use strict";

const POLL_MS = 500;
const PAGE = 12;
const ACTIVE = new Set(["queued", "in_progress"]);
const KEY_STORE = "cinematic-api-key";

const $ = (selector) => document.querySelector(selector);
const cards = new Map(); // job id -> {card, job}
let apiKey = localStorage.getItem(KEY_STORE) || "";
let nextAfter = null;

class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("#key-form").hidden = false;
    throw new ApiError("this server needs an API key");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not our error body */ }
    throw new ApiError(message);
  }
  return response;
}

const contentUrl = (id, variant) => `/v1/videos/${encodeURIComponent(id)}/content` + (variant === "mp4" ? "" : `?variant=${variant}`);

// Without a key the browser fetches the file itself (Range requests, so seeking works); with one, a <video> cannot
// send the header, so the file is fetched here and handed over as a blob.
async function fileUrl(id, variant) {
  if (!apiKey) return contentUrl(id, variant);
  const response = await api(contentUrl(id, variant));
  return URL.createObjectURL(await response.blob());
}

function settingsText(job) {
  const sampler = job.sampler === "lcm" ? `lcm (timestep scaling ${job.timestep_scaling})` : job.sampler;
  const parts = [`seed ${job.seed}`, job.size, `${job.num_frames} frames at ${job.fps} fps`, `${job.num_inference_steps} steps`,
    `guidance ${job.guidance_scale}`, sampler];
  if (job.negative_prompt) parts.push(`not: ${job.negative_prompt}`);
  if (job.init_video) parts.push(`from a video, strength ${job.strength}`);
  if (job.init_image) parts.push("from a picture");
  if (job.loop) parts.push("loop");
  if (job.freeu) parts.push("FreeU");
  if (job.freeinit) parts.push(`FreeInit ×${job.freeinit}`);
  for (const lora of job.loras || []) parts.push(`LoRA ${lora.name} ×${lora.scale}`);
  return parts.join(" · ");
}

function statusText(job) {
  if (job.status === "in_progress") return `generating… ${job.progress}%`;
  if (job.status === "failed") return `failed: ${job.error ? job.error.message : "unknown error"}`;
  if (job.status === "completed" && job.completed_at && job.started_at) {
    return `completed in ${job.completed_at - job.started_at} s`;
  }
  return job.status.replace("_", " ");
}

function newCard(job) {
  const card = $("#job-card").content.firstElementChild.cloneNode(true);
  card.dataset.id = job.id;
  card.querySelector(".remove").addEventListener("click", () => removeJob(job.id));
  for (const link of card.querySelectorAll(".download")) {
    link.addEventListener("click", (event) => download(event, job.id, link.dataset.variant));
  }
  cards.set(job.id, { card, job: null });
  return card;
}

function render(job) {
  const entry = cards.get(job.id);
  if (!entry) return;
  const { card } = entry;
  const before = entry.job;
  entry.job = job;
  card.dataset.status = job.status;
  const progress = card.querySelector("progress");
  progress.value = job.progress;
  progress.hidden = job.status === "completed";
  const status = card.querySelector(".status");
  status.textContent = statusText(job);
  status.className = `status ${job.status}`;
  card.querySelector(".prompt").textContent = job.prompt_schedule || job.prompt;
  card.querySelector(".settings").textContent = settingsText(job);
  card.querySelector(".placeholder").textContent = ACTIVE.has(job.status) ? `${job.progress}%` : job.status;
  card.querySelector(".remove").textContent = ACTIVE.has(job.status) ? "Cancel" : "Delete";
  for (const link of card.querySelectorAll(".download")) {
    link.hidden = job.status !== "completed";
    link.href = contentUrl(job.id, link.dataset.variant);
    link.download = `${job.id}.${link.dataset.variant}`;
  }
  if (job.status === "completed" && (!before || before.status !== "completed")) showVideo(card, job.id);
}

async function showVideo(card, id) {
  const video = card.querySelector("video");
  try {
    video.src = await fileUrl(id, "mp4");
  } catch (error) {
    card.querySelector(".placeholder").textContent = error.message;
    return;
  }
  video.hidden = false;
  card.querySelector(".placeholder").hidden = true;
  video.autoplay = true;
  video.play().catch(() => { /* autoplay refused: the controls are there */ });
}

async function download(event, id, variant) {
  if (!apiKey) return; // the link works as it is
  event.preventDefault();
  const link = document.createElement("a");
  link.href = await fileUrl(id, variant);
  link.download = `${id}.${variant}`;
  link.click();
}

async function removeJob(id) {
  try {
    const job = await (await api(`/v1/videos/${encodeURIComponent(id)}`, { method: "DELETE" })).json();
    if (job.object === "video.deleted") {
      cards.get(id)?.card.remove();
      cards.delete(id);
    } else {
      render(job);
    }
  } catch (error) {
    $("#form-error").textContent = error.message;
  }
}

async function loadPage() {
  const query = new URLSearchParams({ limit: PAGE });
  if (nextAfter) query.set("after", nextAfter);
  const page = await (await api(`/v1/videos?${query}`)).json();
  for (const job of page.data) {
    if (cards.has(job.id)) continue;
    $("#jobs").append(newCard(job));
    render(job);
  }
  nextAfter = page.has_more ? page.last_id : null;
  $("#more").hidden = !page.has_more;
}

const INTEGERS = new Set(["num_frames", "num_inference_steps", "seed", "window", "window_stride", "freeinit"]);
const NUMBERS = new Set(["guidance_scale", "strength", "timestep_scaling"]);
const CHECKS = new Set(["loop", "freeu"]);

// A picked file as a data: URL, which the server takes in place of base64.
const dataUrl = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(new ApiError(`cannot read ${file.name}`));
  reader.readAsDataURL(file);
});

async function formBody(form) {
  const body = {};
  for (const [name, value] of new FormData(form)) {
    if (value instanceof File) {
      if (value.size) body[name] = await dataUrl(value);
      continue;
    }
    const text = String(value).trim();
    if (!text || name === "lora_scale") continue;
    if (name === "lora") {
      const scale = Number.parseFloat(form.lora_scale.value);
      body.loras = [{ name: text, scale: Number.isFinite(scale) ? scale : 1.0 }];
    } else if (CHECKS.has(name)) {
      body[name] = true;
    } else {
      body[name] = INTEGERS.has(name) ? Number.parseInt(text, 10) : NUMBERS.has(name) ? Number.parseFloat(text) : text;
    }
  }
  if (body.prompt_schedule) delete body.prompt; // the schedule names every prompt
  return body;
}

async function submit(event) {
  event.preventDefault();
  const error = $("#form-error");
  error.textContent = "";
  try {
    const body = await formBody(event.target);
    if (!body.prompt && !body.prompt_schedule) throw new ApiError("write a prompt (or a prompt schedule)");
    const response = await api("/v1/videos", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const job = await response.json();
    $("#jobs").prepend(newCard(job));
    render(job);
  } catch (failure) {
    error.textContent = failure.message;
  }
}

async function poll() {
  const active = [...cards.values()].filter(({ job }) => job && ACTIVE.has(job.status));
  await Promise.all(active.map(async ({ job }) => {
    try {
      render(await (await api(`/v1/videos/${encodeURIComponent(job.id)}`)).json());
    } catch (_) { /* shown on the next success; a deleted job simply stops updating */ }
  }));
  setTimeout(poll, POLL_MS);
}

async function start() {
  const health = await (await fetch("/healthz")).json();
  const d = health.defaults;
  const form = $("#create");
  form.num_frames.placeholder = d.num_frames;
  form.num_frames.max = health.limits.max_frames;
  form.size.placeholder = d.size;
  form.num_inference_steps.placeholder = d.num_inference_steps;
  form.num_inference_steps.max = health.limits.max_steps;
  form.guidance_scale.placeholder = d.guidance_scale;
  form.timestep_scaling.placeholder = d.timestep_scaling;
  form.prompt.maxLength = health.limits.max_prompt;
  for (const name of health.samplers) form.sampler.add(new Option(name, name, false, name === d.sampler));
  for (const name of health.loras || []) form.lora.add(new Option(name, name));
  form.lora.disabled = !(health.loras || []).length;
  $("#server").textContent = `model ${health.model} · ${health.workers.map((w) => w.device).join(", ")}`;
  form.addEventListener("submit", submit);
  $("#more").addEventListener("click", () => loadPage().catch(() => {}));
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = event.target.key.value;
    localStorage.setItem(KEY_STORE, apiKey);
    event.target.hidden = true;
    loadPage().catch(() => {});
  });
  if (health.auth && !apiKey) $("#key-form").hidden = false;
  await loadPage().catch(() => {});
  poll();
}

start();
