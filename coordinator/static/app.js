// Pomona's web page: polls /api/cluster (the coordinator's status, links, expert load) every
// POLL_MS, draws the cluster, a power chart and the expert heat map, and streams chat replies
// from /v1/chat/completions (OpenAI's SSE format). Plain browser JavaScript, no build step.
"use strict";

const POLL_MS = 2000;
const HISTORY = 60; // power samples kept per node
const COLORS = ["#4a86c5", "#d9822b", "#3c9d5d", "#b04a8c", "#8a6d3b", "#5a5ad6"];
const powerHistory = {}; // node -> [watts between consecutive polls]
const lastEnergy = {}; // node -> [joules since up, time of the poll in ms]
const conversation = [];

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};
const ms = (s) => (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
const mib = (b) => (b / 2 ** 20).toFixed(b < 2 ** 24 ? 2 : 0) + " MiB";

// [0, 1, 2, 3, 7] -> "0-3, 7"
function compactIds(ids) {
  const parts = [];
  for (let i = 0; i < ids.length; i++) {
    let j = i;
    while (j + 1 < ids.length && ids[j + 1] === ids[j] + 1) j++;
    parts.push(j > i ? `${ids[i]}-${ids[j]}` : String(ids[i]));
    i = j;
  }
  return parts.join(", ");
}

function drawNodes(status, links) {
  const box = $("nodes");
  box.replaceChildren();
  const stages = status.stages || [];
  stages.forEach((stage, index) => {
    const card = el("div", "node" + (stage.state === "unreachable" ? " unreachable" : ""));
    card.dataset.node = stage.node;
    card.append(el("div", "name", `${stage.node}  (${stage.address})`));
    const what = stage.experts_only ? "routed experts only"
      : `layers [${stage.layer_start}, ${stage.layer_end})` + (stage.is_first ? " + embed" : "")
        + (stage.is_last ? " + head" : "");
    card.append(el("div", "", what));
    const groups = (status.expert_groups || []).filter((g) => g.node === stage.node);
    if (groups.length) {
      card.append(el("div", "experts", "routed experts: " +
        groups.map((g) => `layer ${g.layer} [${compactIds(g.expert_ids)}]`).join(", ")));
    }
    const used = Number(stage.rss_bytes), total = Number(stage.memory_total_bytes) || 1;
    const bar = el("div", "bar"), fill = el("div");
    fill.style.width = Math.min(100, (100 * used) / total).toFixed(1) + "%";
    bar.append(fill);
    card.append(bar, el("div", "", `memory ${mib(used)}; KV cache ${mib(Number(stage.cache_bytes))}`));
    card.append(el("div", "load", `active ${stage.active_requests}; compute ` +
      (stage.measured_compute_s ? ms(stage.measured_compute_s) + "/token" : "-")));
    card.append(el("div", "power", `power ${stage.power_w.toFixed(1)} W on average since up (${stage.power_basis || "?"})`));
    box.append(card);
    if (!stage.experts_only && stage.next_node && index < stages.length - 1) {
      const link = links.find((l) => l.source === stage.node && l.target === stage.next_node);
      box.append(el("div", "arrow", "→ " + (link ? ms(link.latency_s) : "")));
    }
  });
  const rows = $("links").querySelector("tbody");
  rows.replaceChildren();
  for (const link of links) {
    const row = el("tr");
    row.append(el("td", "", link.source), el("td", "", link.target), el("td", "", ms(link.latency_s)),
      el("td", "", link.bandwidth_bytes_per_s ? (link.bandwidth_bytes_per_s / 1e6).toFixed(0) + " MB/s" : "unbounded"));
    rows.append(row);
  }
}

function drawPower(status) {
  const canvas = $("power-chart"), ctx = canvas.getContext("2d");
  const now = performance.now();
  for (const stage of status.stages || []) {
    const series = (powerHistory[stage.node] = powerHistory[stage.node] || []);
    // Live power: the energy drawn since the previous poll over the time between them.
    const previous = lastEnergy[stage.node];
    const live = previous && now > previous[1] ? (stage.energy_j - previous[0]) / ((now - previous[1]) / 1000) : stage.power_w;
    lastEnergy[stage.node] = [stage.energy_j, now];
    series.push(Math.max(0, live));
    if (series.length > HISTORY) series.shift();
  }
  const names = Object.keys(powerHistory);
  const top = Math.max(1, ...names.flatMap((n) => powerHistory[n]));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px sans-serif";
  names.forEach((name, i) => {
    const series = powerHistory[name];
    ctx.strokeStyle = ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.beginPath();
    series.forEach((w, x) => {
      const px = (x / (HISTORY - 1)) * (canvas.width - 60), py = canvas.height - 10 - (w / top) * (canvas.height - 20);
      x ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
    });
    ctx.stroke();
    ctx.fillText(`${name} ${series[series.length - 1].toFixed(1)} W`, canvas.width - 58, 14 + 14 * i);
  });
  const bases = [...new Set((status.stages || []).map((s) => s.power_basis))];
  $("power-note").textContent = `watts per node between polls (${POLL_MS / 1000} s); ${bases.join("; ")}; top ${top.toFixed(1)} W`;
}

function drawHeatmap(experts, groups) {
  const owners = {}; // "layer/expert" -> [nodes]
  for (const group of groups || []) {
    for (const expert of group.expert_ids) (owners[`${group.layer}/${expert}`] ||= []).push(group.node);
  }
  const counts = {}; // layer -> expert -> tokens
  let maxExpert = -1;
  for (const node of experts.nodes || []) {
    for (const layer of node.stats.layers || []) {
      const row = (counts[layer.layer] = counts[layer.layer] || {});
      layer.expert_ids.forEach((expert, i) => {
        row[expert] = (row[expert] || 0) + Number(layer.tokens[i]);
        maxExpert = Math.max(maxExpert, expert);
      });
    }
  }
  const box = $("heatmap");
  box.replaceChildren();
  const layers = Object.keys(counts).map(Number).sort((a, b) => a - b);
  if (!layers.length) {
    $("experts-note").textContent = "no expert load yet (dense model, or every expert on its stage node)";
    return;
  }
  $("experts-note").textContent = "tokens computed per routed expert on expert-parallel layers (rows: MoE layers)";
  box.style.gridTemplateColumns = `auto repeat(${maxExpert + 1}, 1fr)`;
  const top = Math.max(1, ...layers.flatMap((l) => Object.values(counts[l])));
  box.append(el("div", "label", ""));
  for (let e = 0; e <= maxExpert; e++) box.append(el("div", "label", String(e)));
  for (const layer of layers) {
    box.append(el("div", "label", `layer ${layer}`));
    for (let e = 0; e <= maxExpert; e++) {
      const tokens = counts[layer][e] || 0;
      const cell = el("div", "cell", tokens ? String(tokens) : "");
      const heat = tokens / top;
      cell.style.background = `rgba(214, 69, 40, ${0.08 + 0.92 * heat})`;
      const where = owners[`${layer}/${e}`] ? ` on ${owners[`${layer}/${e}`].join(", ")}` : "";
      cell.title = `layer ${layer}, expert ${e}${where}: ${tokens} tokens`;
      box.append(cell);
    }
  }
}

async function poll() {
  try {
    const response = await fetch("/api/cluster");
    const data = await response.json();
    const status = data.status;
    $("model").textContent = status.model;
    $("state").textContent = status.state + (status.error ? ` (${status.error})` : "");
    $("requests").textContent = `${data.requests.active} active, ${data.requests.queued} queued`;
    $("energy").textContent = `${status.energy_j.toFixed(0)} J (${status.energy_basis || "?"})`;
    const p = status.predicted;
    $("prediction").textContent = p && p.decode_tok_s
      ? `objective ${status.objective}; predicted ${p.decode_tok_s.toFixed(1)} tok/s, ${p.j_per_token.toFixed(2)} J/token`
      : "";
    drawNodes(status, data.links);
    drawPower(status);
    drawHeatmap(data.experts, status.expert_groups);
    document.body.dataset.polled = String(Number(document.body.dataset.polled || 0) + 1);
  } catch (error) {
    $("state").textContent = "unreachable (" + error + ")";
  }
  setTimeout(poll, POLL_MS);
}

async function chat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  conversation.push({ role: "user", content: text });
  const log = $("chat-log");
  log.append(el("div", "message user", text));
  const reply = el("div", "message assistant", "");
  log.append(reply);
  const headers = { "Content-Type": "application/json" };
  if ($("api-key").value) headers.Authorization = "Bearer " + $("api-key").value;
  const body = {
    messages: conversation, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("chat-max-tokens").value), temperature: Number($("chat-temperature").value),
  };
  $("chat-send").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: ?/, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.choices.length && chunk.choices[0].delta.content) reply.textContent += chunk.choices[0].delta.content;
        if (chunk.usage) {
          const u = chunk.usage;
          $("chat-usage").textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} generated tokens` +
            (u.energy_source ? `; ${u.energy_j.toFixed(2)} J (${u.j_per_token.toFixed(3)} J/token, ${u.energy_source})` : "");
        }
      }
    }
    conversation.push({ role: "assistant", content: reply.textContent });
    reply.dataset.done = "true";
  } catch (error) {
    reply.className = "message error";
    reply.textContent = String(error.message || error);
    conversation.pop();
  } finally {
    $("chat-send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", chat);
poll();
