// The node pane's "Global weights" section: a feature's strongest connections across all contexts, from
// GET /api/features/{layer}/{feature}/weights (virtual weights, ERA or TWERA; upstream or downstream).
// Every text reaches the page through textContent (util.el), never innerHTML.
import {clear, el, fmt} from "./util.js";

const STYLE = `
.gweights { margin-top: 8px; border-top: 1px solid #eee; padding-top: 4px; }
.gweights h4 { margin: 4px 0 2px; font-size: 12px; display: inline; }
.gweights select { font-size: 11px; margin-left: 4px; }
.gw-list { list-style: none; margin: 2px 0; padding: 0; max-height: 180px; overflow: auto; }
.gw-list li { padding: 1px 4px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.gw-list li.in-graph { cursor: pointer; }
.gw-list li.in-graph:hover { background: #f3f0fa; }
.gw-list .w { font-family: monospace; display: inline-block; width: 5.5em; text-align: right; }
.gw-list .ref { font-family: monospace; display: inline-block; width: 4.5em; color: #556; margin-left: 4px; }
`;

function ensureStyle() {
  if (document.getElementById("gweights-style")) return;
  document.head.append(el("style", {id: "gweights-style", text: STYLE}));
}

async function fetchWeights(layer, feature, kind, direction) {
  const r = await fetch(`/api/features/${layer}/${feature}/weights?kind=${encodeURIComponent(kind)}` +
    `&direction=${encodeURIComponent(direction)}&top=15`);
  let data;
  try { data = await r.json(); } catch { data = {error: `${r.status} ${r.statusText}`}; }
  if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
  return data;
}

// the first node of the shown graph that is this feature (at any position), or -1
function nodeOf(app, layer, feature) {
  const d = app.d;
  for (let i = 0; i < d.id.length; i++) if (d.kind[i] === 0 && d.layer[i] === layer && d.feature[i] === feature) return i;
  return -1;
}

export function weightsSection(app, layer, feature) {
  ensureStyle();
  const kind = el("select", {"data-testid": "gw-kind", title: "virtual weight, or corrected by co-activation (ERA, TWERA)"},
    ...[["auto", "best available"], ["virtual", "virtual"], ["era", "ERA"], ["twera", "TWERA"]].map(
      ([v, t]) => el("option", {value: v, text: t})));
  const direction = el("select", {"data-testid": "gw-direction"},
    el("option", {value: "upstream", text: "what feeds it"}), el("option", {value: "downstream", text: "what it feeds"}));
  const body = el("div", {"data-testid": "gw-body"});
  let seq = 0;
  const load = async () => {
    const mine = ++seq;
    clear(body).append(el("p", {class: "hint", text: "loading global weights…"}));
    let data;
    try { data = await fetchWeights(layer, feature, kind.value, direction.value); } catch (e) {
      if (mine === seq) clear(body).append(el("p", {class: "hint", "data-testid": "gw-error", text: e.message}));
      return;
    }
    if (mine !== seq) return;
    render(app, body, data);
  };
  kind.addEventListener("change", load);
  direction.addEventListener("change", load);
  load();
  return el("div", {class: "gweights", "data-testid": "global-weights"}, el("h4", {text: "Global weights"}), kind, direction, body);
}

function render(app, body, data) {
  clear(body);
  const name = {virtual: "virtual weight", era: "ERA", twera: "TWERA"}[data.kind];
  const where = data.kind === "virtual" ? "all features" : `${data.candidates} kept pairs, ${data.tokens} tokens`;
  body.append(el("div", {class: "hint", "data-testid": "gw-info", text: `${name}, ranked by |value| among ${where}`}));
  for (const note of data.notes) body.append(el("div", {class: "hint", text: note}));
  const ul = el("ul", {class: "gw-list", "data-testid": "gw-rows"});
  for (const r of data.rows) {
    const i = nodeOf(app, r.layer, r.feature);
    const title = data.kind === "virtual" ? `V = ${r.virtual}` :
      `V = ${fmt(r.virtual)}, E[ai aj] = ${fmt(r.coact)}, |true value| ≤ ${r.bound === null ? "∞" : fmt(r.bound)}`;
    ul.append(el("li", {class: i >= 0 ? "in-graph" : undefined, "data-testid": "gw-row", title: title + (i >= 0 ? " · in this graph: click" : ""),
      onclick: i >= 0 ? () => app.select(i) : undefined},
      el("span", {class: "w", text: (r.value >= 0 ? "+" : "") + fmt(r.value)}),
      el("span", {class: "ref", text: r.id}), " ", el("span", {"data-testid": "gw-label", text: r.label || ""})));
  }
  body.append(ul);
  const rest = data.rest_bound === null ? "∞" : fmt(data.rest_bound);
  body.append(el("div", {class: "hint", text: data.rows.length ? `every pair not listed: |value| ≤ ${rest}` : "no connections"}));
}
