// The page: wires the panes together, keeps the person's state (saved on the server with the graph, and the
// view in the URL so a link reopens it), and exposes a small hook for tests and the benchmark
// (window.__cltrace: node positions on screen, state, timings).
import {api, waitJob} from "./api.js";
import {decodeView, GraphView} from "./graph.js";
import {NodePane} from "./nodepane.js";
import {SteerPane} from "./steer.js";
import {SubgraphPane} from "./subgraph.js";
import {clear, download, el, tok} from "./util.js";

const $ = id => document.getElementById(id);
const DEFAULT_STATE = {pinned: [], supernodes: [], layout: {}, node_threshold: 0.8, edge_threshold: 0.98,
  rejected: [], clicked: "", link_type: "both"};

class App {
  constructor() {
    this.name = null; this.d = null; this.state = {...DEFAULT_STATE}; this.diff = null;
    this.timings = {}; this.ready = false; this.saveTimer = null; this.saves = 0;
    this.view = new GraphView($("graph-wrap"), $("graph-canvas"), $("graph-overlay"), $("tooltip"),
      {click: (i, pin) => this.onGraphClick(i, pin)});
    this.nodePane = new NodePane($("node-pane"), this);
    this.sub = new SubgraphPane(this);
    this.steer = new SteerPane(this);
    this.wire();
  }

  wire() {
    $("graph-select").onchange = ev => ev.target.value ? this.open(ev.target.value) : this.showList();
    $("prune-btn").onclick = () => this.reprune();
    for (const id of ["node-thr", "edge-thr"]) $(id).addEventListener("keydown", ev => { if (ev.key === "Enter") this.reprune(); ev.stopPropagation(); });
    $("pin-btn").onclick = () => { if (this.view.selected >= 0) this.togglePin(this.d.id[this.view.selected]); };
    $("diff-a").onchange = $("diff-b").onchange = () => this.setDiff();
    $("search").addEventListener("input", () => this.search());
    $("search").addEventListener("keydown", ev => {
      ev.stopPropagation();
      if (ev.key === "Enter") { const first = $("search-results").querySelector("button"); if (first) first.click(); }
    });
    $("export-svg").onclick = () => download(`${this.name}.svg`, new Blob([this.view.toSVG()], {type: "image/svg+xml"}));
    $("export-png").onclick = async () => download(`${this.name}.png`, await this.view.toPNG());
    $("export-json").onclick = () => this.exportJson(false);
    $("export-sub-json").onclick = () => this.exportJson(true);
    $("export-sub-svg").onclick = () => download(`${this.name}-subgraph.svg`, new Blob([this.sub.toSVG()], {type: "image/svg+xml"}));
    $("export-sub-png").onclick = async () => download(`${this.name}-subgraph.png`, await this.sub.toPNG());
    $("new-graph-btn").onclick = () => $("new-graph").showModal();
    $("ng-close").onclick = () => $("new-graph").close();
    $("ng-go").onclick = () => this.trace();
    document.addEventListener("keydown", ev => {
      if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLTextAreaElement) return;
      if (ev.key === "Escape") this.select(-1);
      if (ev.key === "p" && this.view.selected >= 0) this.togglePin(this.d.id[this.view.selected]);
    });
  }

  status(msg, error = false) { const s = $("status"); s.textContent = msg; s.className = error ? "error" : ""; }

  async init() {
    const q = new URLSearchParams(location.search);
    await this.loadList();
    if (q.get("graph")) await this.open(q.get("graph"), q);
    else this.showList();
    this.ready = true;
  }

  async loadList() {
    const {graphs} = await api.graphs();
    this.graphs = graphs;
    const sel = clear($("graph-select"));
    sel.append(el("option", {value: "", text: `graphs (${graphs.length})`}));
    for (const g of graphs) sel.append(el("option", {value: g.name, text: `${g.name}: ${g.prompt.slice(0, 40)}`}));
    if (this.name) sel.value = this.name;
  }

  showList() {
    this.name = null; this.d = null;
    $("graph-wrap").hidden = true;
    const box = clear($("graph-list")); box.hidden = false;
    box.append(el("h3", {text: "Graphs in the served folder"}));
    const t = el("table", {class: "graphs", "data-testid": "graph-table"},
      el("tr", {}, el("th", {text: "name"}), el("th", {text: "prompt"}), el("th", {text: "tokens"}), el("th", {text: "model"})));
    for (const g of this.graphs) {
      t.append(el("tr", {onclick: () => this.open(g.name)}, el("td", {}, el("a", {href: `?graph=${encodeURIComponent(g.name)}`, text: g.name,
        onclick: ev => { ev.preventDefault(); this.open(g.name); }})), el("td", {text: g.prompt}), el("td", {text: g.n_tokens}), el("td", {text: g.model || ""})));
    }
    box.append(t, el("p", {class: "hint", text: "New graph traces a prompt on the server (needs --model and --transcoders)."}));
    history.replaceState(null, "", location.pathname);
  }

  async open(name, q = new URLSearchParams()) {
    this.name = name; this.logitsOf = null;
    $("graph-list").hidden = true; $("graph-wrap").hidden = false; $("graph-select").value = name;
    this.nodePane.clear(); clear($("suggestions")); clear($("steer-result"));
    try {
      this.state = {...DEFAULT_STATE, ...(await api.state(name))};
    } catch (e) { this.status(e.message, true); return; }
    if (q.get("node")) this.state.node_threshold = parseFloat(q.get("node"));
    if (q.get("edge")) this.state.edge_threshold = parseFloat(q.get("edge"));
    if (q.get("pinned") !== null && q.get("pinned") !== undefined && q.has("pinned")) this.state.pinned = q.get("pinned").split(",").filter(Boolean);
    this.diff = q.get("diff") ? q.get("diff").split(",").map(Number) : null;
    $("node-thr").value = this.state.node_threshold; $("edge-thr").value = this.state.edge_threshold;
    await this.loadView("firstRender");
    const clicked = q.get("clicked") || this.state.clicked;
    if (clicked && this.d.index.has(clicked)) this.select(this.d.index.get(clicked));
    await this.sub.refresh();
    this.steer.render();
  }

  // returns false when a later request overtook this one (its answer is dropped: the last request wins)
  async loadView(timing) {
    const t0 = performance.now(), seq = this.viewSeq = (this.viewSeq || 0) + 1;
    let v;
    try { v = await api.view(this.name, this.state.node_threshold, this.state.edge_threshold, this.diff); }
    catch (e) { this.status(e.message, true); return false; }
    if (seq !== this.viewSeq) return false;
    const t1 = performance.now();
    this.d = decodeView(v);
    this.view.pinned = new Set(this.state.pinned); this.view.selected = -1; this.view.marked = new Set();
    this.view.setData(this.d);
    const t2 = performance.now();
    this.timings[timing] = t2 - t0; this.timings[timing + "_fetch"] = t1 - t0; this.timings[timing + "_draw"] = t2 - t1;
    this.fillLogits(v);
    const c = v.counts, s = v.meta_scores;
    $("graph-info").textContent = `${v.prompt}  —  showing ${c.nodes_shown} of ${c.nodes_total} nodes (${c.features_shown} of ${c.features_total} features), ${c.edges_shown} of ${c.edges_total} edges after pruning at ${v.node_threshold}/${v.edge_threshold}` +
      (s ? ` · whole graph: replacement ${s.replacement.toFixed(3)}, completeness ${s.completeness.toFixed(3)}` : "") + ` · ${v.model}`;
    this.syncUrl();
    return true;
  }

  // the two logit pickers: rebuilt for a new graph only, so a half-made choice survives a re-prune
  fillLogits(v) {
    if (this.logitsOf === this.name) return;
    this.logitsOf = this.name;
    for (const [id, k] of [["diff-a", 0], ["diff-b", 1]]) {
      const sel = clear($(id));
      sel.append(el("option", {value: "", text: "–"}));
      for (const l of v.logits) sel.append(el("option", {value: l.index, text: `${tok(l.token)} (${l.prob.toFixed(2)})`}));
      sel.value = this.diff ? String(this.diff[k]) : "";
    }
  }

  async setDiff() {
    const a = $("diff-a").value, b = $("diff-b").value;
    this.diff = a !== "" && b !== "" && a !== b ? [parseInt(a, 10), parseInt(b, 10)] : null;
    const diff = this.diff;
    if (await this.loadView("diff") && diff) this.select(this.d.index.get(`diff_${diff[0]}_${diff[1]}`));
  }

  async reprune() {
    const node = parseFloat($("node-thr").value), edge = parseFloat($("edge-thr").value);
    if (!(node > 0 && node <= 1 && edge > 0 && edge <= 1)) { this.status("thresholds must be in (0, 1]", true); return; }
    const clicked = this.view.selected >= 0 ? this.d.id[this.view.selected] : null;
    this.state.node_threshold = node; this.state.edge_threshold = edge;
    if (!(await this.loadView("prune"))) return;
    if (clicked && this.d.index.has(clicked)) this.select(this.d.index.get(clicked));
    this.status(`re-pruned in ${this.timings.prune.toFixed(0)} ms`);
    this.changed(false);
  }

  onGraphClick(i, pin) {
    if (i >= 0 && pin) { this.togglePin(this.d.id[i]); return; }
    this.select(i);
  }

  select(i) {
    if (i === undefined) i = -1;
    this.view.select(i);
    this.state.clicked = i >= 0 ? this.d.id[i] : "";
    if (i >= 0) this.nodePane.show(i); else this.nodePane.clear();
    this.syncUrl();
  }

  isPinned(id) { return this.state.pinned.includes(id); }

  togglePin(id) {
    const st = this.state;
    if (this.isPinned(id)) {
      st.pinned = st.pinned.filter(x => x !== id);
      for (const sn of st.supernodes) sn.members = sn.members.filter(m => m !== id);
      st.supernodes = st.supernodes.filter(sn => sn.members.length);
    } else st.pinned.push(id);
    this.changed();
  }

  labelChanged() { this.view.drawStatic(); this.sub.refresh().then(() => this.steer.render()); }

  // something the person built changed: redraw what shows it, save it, put the view in the URL
  changed(refreshSub = true) {
    this.view.pinned = new Set(this.state.pinned);
    this.view.drawOverlay();
    if (refreshSub) this.sub.refresh().then(() => this.steer.render());
    else this.sub.renderSvg();
    this.syncUrl();
    clearTimeout(this.saveTimer);
    this.saveTimer = setTimeout(() => { this.saveTimer = null; this.save(); }, 250);
  }

  async save() {
    if (!this.name) return;
    this.saving = (this.saving || 0) + 1;
    try { await api.saveState(this.name, this.state); this.saves++; this.status("saved"); }
    catch (e) { this.status(`not saved: ${e.message}`, true); }
    finally { this.saving--; }
  }

  syncUrl() {
    if (!this.name) return;
    const q = new URLSearchParams({graph: this.name, node: this.state.node_threshold, edge: this.state.edge_threshold});
    if (this.state.clicked) q.set("clicked", this.state.clicked);
    if (this.state.pinned.length) q.set("pinned", this.state.pinned.join(","));
    if (this.diff) q.set("diff", this.diff.join(","));
    history.replaceState(null, "", "?" + q.toString());
  }

  search() {
    const box = clear($("search-results")), q = $("search").value.trim().toLowerCase(), d = this.d;
    this.view.marked = new Set();
    if (!q || !d) { this.view.drawOverlay(); return; }
    const m = q.match(/^l?(\d+)[:/_](\d+)(?:[@_](\d+))?$/);
    const hits = [];
    for (let i = 0; i < d.n && hits.length < 200; i++) {
      const token = String(d.raw.tokens[d.pos[i]] ?? "").trim().toLowerCase();
      let ok = (d.label[i] || "").toLowerCase().includes(q) || d.id[i].toLowerCase() === q || (d.kind[i] === 0 && token === q);
      if (m && d.kind[i] === 0) ok = ok || (d.layer[i] === +m[1] && d.feature[i] === +m[2] && (m[3] === undefined || d.pos[i] === +m[3]));
      if (/^\d+$/.test(q) && d.kind[i] === 0 && d.feature[i] === +q) ok = true;
      if (ok) hits.push(i);
    }
    this.view.marked = new Set(hits);
    this.view.drawOverlay();
    box.append(el("span", {class: "hint", text: `${hits.length}${hits.length === 200 ? "+" : ""} found `}));
    for (const i of hits.slice(0, 8)) box.append(el("button", {class: "hit", "data-testid": "search-hit", text: this.view.nodeTitle(i).slice(0, 40), onclick: () => this.select(i)}));
  }

  async exportJson(sub) {
    const r = await fetch(api.exportUrl(this.name, this.state.node_threshold, this.state.edge_threshold, sub));
    download(`${this.name}${sub ? "-subgraph" : ""}.json`, await r.blob());
  }

  async trace() {
    const prompt = $("ng-prompt").value, prog = clear($("ng-progress"));
    if (!prompt.trim()) { prog.append(el("span", {class: "error", text: "write a prompt"})); return; }
    const bar = el("progress", {max: 1}), text = el("span", {"data-testid": "ng-stage", text: " queued"});
    prog.append(bar, text);
    const t0 = performance.now();
    try {
      const job = await api.trace({prompt, name: $("ng-name").value, max_features: parseInt($("ng-max").value || "400", 10)});
      const r = await waitJob(job, j => {
        if (j.fraction !== null) bar.value = j.fraction; else bar.removeAttribute("value");
        text.textContent = ` ${j.stage} (${((performance.now() - t0) / 1000).toFixed(1)} s)`;
      });
      text.textContent = ` done: ${r.name}`;
      await this.loadList();
      $("new-graph").close();
      await this.open(r.name);
    } catch (e) { text.textContent = " " + e.message; text.className = "error"; }
  }
}

const app = new App();
window.__cltrace = {
  app,
  get ready() { return app.ready; },
  get timings() { return {...app.timings, ...app.view.timings}; },
  state: () => JSON.parse(JSON.stringify(app.state)),
  get saved() { return !app.saveTimer && !app.saving; },
  nodeScreenPos: id => app.view.screenPos(id),
  nodeIds: () => (app.d ? app.d.id.slice() : []),
  kindOf: id => (app.d ? app.d.kind[app.d.index.get(id)] : -1),
};
app.init().catch(e => app.status(e.message, true));
