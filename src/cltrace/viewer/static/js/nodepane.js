// The node pane: the clicked node's edges (sorted, clickable) and its feature's dashboard from the database,
// with the label editable in place (saved to the database, or to the graph's state without one).
import {api} from "./api.js";
import {edgesOf} from "./graph.js";
import {clear, el, fmt, signedColor, tok} from "./util.js";
import {weightsSection} from "./weights.js";
import {qkSection} from "./qk.js";

export class NodePane {
  constructor(root, app) { this.root = root; this.app = app; this.seq = 0; }

  clear() {
    clear(this.root).append(el("p", {class: "hint", text: "Click a node to see its edges and dashboard. Ctrl/Cmd-click pins it. Esc clears."}));
  }

  async show(i) {
    const d = this.app.d, id = d.id[i], seq = ++this.seq;
    clear(this.root);
    const head = el("div", {class: "node-head", "data-testid": "node-head"});
    head.append(el("b", {text: this.app.view.nodeTitle(i)}));
    const pinBtn = el("button", {"data-testid": "pin-node", text: this.app.isPinned(id) ? "Unpin" : "Pin",
      onclick: () => { this.app.togglePin(id); pinBtn.textContent = this.app.isPinned(id) ? "Unpin" : "Pin"; }});
    head.append(" ", pinBtn);
    this.root.append(head);
    if (d.kind[i] === 0) this.root.append(this.labelEditor(i));
    this.root.append(this.edgeLists(i));
    if (d.kind[i] !== 1) this.root.append(qkSection(this.app, id));  // errors carry no QK results
    const dash = el("div", {class: "dashboard", "data-testid": "dashboard"});
    this.root.append(dash);
    if (d.kind[i] !== 0) return;
    dash.before(weightsSection(this.app, d.layer[i], d.feature[i]));
    dash.append(el("p", {class: "hint", text: "loading the dashboard…"}));
    let info;
    try { info = await api.node(this.app.name, id); } catch (e) { clear(dash).append(el("p", {class: "error", text: e.message})); return; }
    if (seq !== this.seq) return;
    clear(dash);
    if (!info.dashboard) {
      dash.append(el("p", {class: "hint", text: info.dashboard_error || "No feature database: start the server with --features DB for dashboards."}));
      return;
    }
    this.dashboard(dash, info.dashboard);
  }

  labelEditor(i) {
    const d = this.app.d, id = d.id[i];
    const input = el("input", {class: "label-input", "data-testid": "label-input", value: d.label[i] || "", maxlength: 500, placeholder: "label this feature"});
    const status = el("span", {class: "hint", "data-testid": "label-status"});
    const save = async () => {
      try {
        const r = await api.label(this.app.name, id, input.value);
        d.label[i] = r.label; input.value = r.label;
        status.textContent = `saved to the ${r.saved_to}`;
        this.app.labelChanged(id, r.label);
      } catch (e) { status.textContent = e.message; }
    };
    input.addEventListener("keydown", ev => { if (ev.key === "Enter") save(); ev.stopPropagation(); });
    return el("div", {class: "label-row"}, el("label", {text: "label "}), input,
      el("button", {"data-testid": "label-save", text: "Save", onclick: save}), " ", status);
  }

  edgeLists(i) {
    const d = this.app.d, {ins, outs} = edgesOf(d, i), max = this.app.view.localMax(i);
    const box = el("div", {class: "edges"});
    for (const [title, list, other] of [["Input edges", ins, e => d.src[e]], ["Output edges", outs, e => d.tgt[e]]]) {
      list.sort((a, b) => Math.abs(d.w[b]) - Math.abs(d.w[a]));
      const ul = el("ul", {class: "edge-list", "data-testid": title === "Input edges" ? "edges-in" : "edges-out"});
      for (const e of list.slice(0, 40)) {
        const j = other(e);
        const li = el("li", {style: `border-left: 6px solid ${signedColor(d.pct[e], max * 0.8)}`,
          onclick: () => this.app.select(j), onmouseenter: () => this.app.view.setHover(j)},
          el("span", {class: "w", text: (d.w[e] >= 0 ? "+" : "") + fmt(d.w[e])}), " ",
          el("span", {text: this.app.view.nodeTitle(j)}));
        ul.append(li);
      }
      if (list.length > 40) ul.append(el("li", {class: "hint", text: `… ${list.length - 40} more`}));
      box.append(el("h4", {text: `${title} (${list.length})`}), ul);
    }
    return box;
  }

  dashboard(box, c) {
    box.append(el("div", {class: "dash-head"},
      el("b", {text: `L${c.layer}/${c.feature}`}), " ",
      el("span", {"data-testid": "dash-label", text: c.label || "(no label)"}), " ",
      el("span", {class: "hint", text: `[${c.label_source}]`})));
    box.append(el("div", {text: `activation here ${fmt(c.activation)} · max ${fmt(c.max_act)} · active on ${(100 * c.frequency).toFixed(3)}% of ${c.tokens_seen} tokens`}));
    box.append(this.histogram(c));
    const tv = (title, list, testid) => el("div", {class: "tokens", "data-testid": testid}, el("b", {text: title + " "}),
      ...list.map(t => el("span", {class: "tokval", text: `${tok(t.token)} ${t.value >= 0 ? "+" : ""}${fmt(t.value, 2)}`})));
    box.append(tv("promotes", c.output_top, "promoted"), tv("suppresses", c.output_bottom, "suppressed"), tv("read from", c.input_top, "inputs"));
    box.append(el("h4", {text: "Top activations"}));
    const top = el("div", {class: "examples", "data-testid": "top-examples"});
    for (const ex of c.top) top.append(this.example(ex, c.max_act));
    box.append(top);
    for (const q of c.quantiles) {
      box.append(el("h4", {text: `Activations ${fmt(q.lo, 2)}–${fmt(q.hi, 2)}`}));
      const div = el("div", {class: "examples"});
      for (const ex of q.examples) div.append(this.example(ex, c.max_act));
      box.append(div);
    }
  }

  example(ex, max) {
    const line = el("div", {class: "example"}, el("span", {class: "exval", text: fmt(ex.value, 2)}));
    ex.tokens.forEach((t, k) => {
      const a = ex.acts[k] > 0 ? Math.min(1, ex.acts[k] / (max || 1)) : 0;
      line.append(el("span", {class: k === ex.center ? "t center" : "t", title: `${fmt(ex.acts[k], 3)}`,
        style: a > 0 ? `background: rgba(245, 130, 20, ${(0.12 + 0.88 * a).toFixed(2)})` : undefined, text: tok(t)}));
    });
    return line;
  }

  histogram(c) {
    const W = 260, H = 60, n = c.histogram.length, maxC = Math.max(1, ...c.histogram);
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 14); svg.setAttribute("data-testid", "histogram");
    const bw = W / n;
    c.histogram.forEach((v, k) => {
      const h = v ? Math.max(1, (Math.log1p(v) / Math.log1p(maxC)) * H) : 0;
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", k * bw); r.setAttribute("y", H - h); r.setAttribute("width", Math.max(1, bw - 0.5)); r.setAttribute("height", h);
      r.setAttribute("fill", "#9fb7d9"); svg.append(r);
    });
    // the current activation: bin 0 is (0, e0), bin k is [e(k-1), e(k)), log-spaced
    const e = c.bin_edges, a = c.activation;
    let k = 0; while (k < e.length && a >= e[k]) k++;
    const x = (Math.min(k, n - 1) + 0.5) * bw;
    const m = document.createElementNS(NS, "line");
    m.setAttribute("x1", x); m.setAttribute("x2", x); m.setAttribute("y1", 0); m.setAttribute("y2", H);
    m.setAttribute("stroke", "#d0006f"); m.setAttribute("stroke-width", 2); m.setAttribute("data-testid", "hist-marker");
    svg.append(m);
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", Math.min(W - 60, x + 3)); t.setAttribute("y", H + 12); t.setAttribute("font-size", 10);
    t.textContent = `this: ${fmt(a, 2)}`; svg.append(t);
    return el("div", {class: "hist"}, svg, el("span", {class: "hint", text: " activation histogram (log bins)"}));
  }
}
