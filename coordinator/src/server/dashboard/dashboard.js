// The fleetmap dashboard: polls the coordinator's /api/state once a
// second with the viewer's API key and shows the fleet, the viewer's jobs
// with their progress, and their recent failures. The only action is
// cancelling one of the viewer's own jobs.
"use strict";

const state = { key: sessionStorage.getItem("fleetmap-key") || "", timer: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function gib(bytes) {
  return (bytes / 2 ** 30).toFixed(1);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
}

function setStatus(text, error) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + state.key },
    cache: "no-store",
  });
  if (!response.ok) {
    throw new Error(response.status + ": " + (await response.text()));
  }
  return response.json();
}

function meter(busy, total, label) {
  const m = el("meter", { min: "0", max: String(Math.max(total, 1)), value: String(busy) });
  return el("span", {}, m, " " + label);
}

function renderNodes(nodes) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(
    ...nodes.map((n) =>
      el(
        "tr",
        { "data-node": n.name },
        el("td", {}, n.name),
        el("td", {}, meter(n.cores - n.free_cores, n.cores, `${n.cores - n.free_cores}/${n.cores}`)),
        el("td", {}, `${gib(n.memory_bytes - n.free_memory_bytes)}/${gib(n.memory_bytes)} GiB`),
        el("td", {}, `${n.gpus - n.free_gpus}/${n.gpus}`),
        el("td", {}, n.isolation),
      ),
    ),
  );
}

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(
    ...jobs.map((j) => {
      const total = j.total_inputs ?? Math.max(j.inputs_done, 1);
      const progress = el("progress", { max: String(total), value: String(j.inputs_done) });
      const live = j.state === "running" || j.state === "waiting";
      const cancel = live ? el("button", { class: "cancel", "data-job": String(j.job), type: "button" }, "Cancel") : "";
      if (live) cancel.addEventListener("click", () => cancelJob(j.job));
      return el(
        "tr",
        { "data-job": String(j.job), "data-state": j.state },
        el("td", {}, j.job),
        el("td", {}, j.name || "(unnamed)"),
        el("td", { class: "state-" + j.state, title: j.state_detail || "" }, j.state),
        el("td", {}, progress, ` ${j.inputs_done}/${j.total_inputs ?? "?"}`),
        el("td", {}, j.slots),
        el("td", {}, j.nodes),
        el("td", {}, when(j.started)),
        el("td", {}, cancel),
      );
    }),
  );
  const failures = jobs.filter((j) => j.state === "failed" || j.failures.length > 0);
  document.getElementById("failures").replaceChildren(
    ...failures.map((j) =>
      el(
        "div",
        { "data-job": String(j.job) },
        el("h3", {}, `job ${j.job}: ${j.name || "(unnamed)"} (${j.state})`),
        ...(j.state === "failed" ? [el("pre", {}, j.state_detail || "")] : []),
        ...j.failures.map((f) => el("pre", {}, f)),
      ),
    ),
  );
}

async function refresh() {
  try {
    const s = await api("/api/state");
    renderNodes(s.nodes);
    renderJobs(s.jobs);
    setStatus(`${s.principal} at ${location.host}: ${s.nodes.length} node(s), updated ${new Date().toLocaleTimeString()}`);
    document.getElementById("login").hidden = true;
    document.getElementById("board").hidden = false;
  } catch (e) {
    setStatus("cannot read the fleet: " + e.message, true);
    if (String(e.message).startsWith("401")) stop();
  }
}

async function cancelJob(job) {
  try {
    await api(`/api/jobs/${job}/cancel`, { method: "POST" });
    await refresh();
  } catch (e) {
    setStatus(`cannot cancel job ${job}: ${e.message}`, true);
  }
}

function start() {
  sessionStorage.setItem("fleetmap-key", state.key);
  refresh();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, 1000);
}

function stop() {
  clearInterval(state.timer);
  document.getElementById("login").hidden = false;
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = document.getElementById("key").value.trim();
  start();
});

if (state.key) start();
