// The steering pane: pinned features and supernodes, each scaled (×) or set (=) at its own positions or at
// every position; constrained (frozen attention, the graph's model) or free (the real model); before and after
// side by side, with the graph's direct prediction next to the measured logit change.
import {api, waitJob} from "./api.js";
import {clear, el, fmt, tok} from "./util.js";

export class SteerPane {
  constructor(app) {
    this.app = app;
    this.itemsEl = document.getElementById("steer-items");
    this.result = document.getElementById("steer-result");
    document.getElementById("steer-run").onclick = () => this.run();
  }

  render() {
    const st = this.app.state, d = this.app.d, box = clear(this.itemsEl);
    const isFeature = id => { const n = this.app.sub.info.nodes[id]; return n ? n.kind === 0 : d?.kind[d.index.get(id)] === 0; };
    const rows = [];
    for (const sn of st.supernodes) rows.push({key: sn.id, text: `▣ ${sn.name}`, nodes: sn.members.filter(isFeature)});
    for (const id of st.pinned) if (!this.app.sub.groupOf(id) && isFeature(id)) rows.push({key: id, text: `${id} · ${this.app.sub.label(id)}`, nodes: [id]});
    if (!rows.length) { box.append(el("p", {class: "hint", text: "Pin features (or group them) to steer them."})); return; }
    for (const r of rows) {
      if (!r.nodes.length) continue;
      box.append(el("div", {class: "steer-row", "data-testid": "steer-row", "data-key": r.key},
        el("input", {type: "checkbox", class: "s-on", checked: true}),
        el("span", {class: "s-text", text: ` ${tok(r.text).slice(0, 40)} `}),
        el("select", {class: "s-op"}, el("option", {value: "scale", text: "× multiplier"}), el("option", {value: "set", text: "= value"})),
        el("input", {class: "s-val", "data-testid": "steer-value", type: "number", step: "0.5", value: "0", size: 4}),
        el("select", {class: "s-pos"}, el("option", {value: "node", text: "at its positions"}), el("option", {value: "all", text: "at every position"}))));
      box.lastChild.dataset.nodes = JSON.stringify(r.nodes);
    }
  }

  async run() {
    const items = [...this.itemsEl.querySelectorAll(".steer-row")].filter(r => r.querySelector(".s-on").checked).map(r => ({
      nodes: JSON.parse(r.dataset.nodes), op: r.querySelector(".s-op").value,
      value: parseFloat(r.querySelector(".s-val").value || "0"), positions: r.querySelector(".s-pos").value,
    }));
    const out = clear(this.result);
    if (!items.length) { out.append(el("p", {class: "error", text: "choose at least one pinned feature or supernode"})); return; }
    const req = {items, mode: document.getElementById("steer-mode").value,
      n_tokens: parseInt(document.getElementById("steer-n").value || "0", 10)};
    const prog = el("p", {class: "hint", "data-testid": "steer-progress", text: "queued…"});
    out.append(prog);
    try {
      const job = await api.steer(this.app.name, req);
      const r = await waitJob(job, j => { prog.textContent = `${j.status}: ${j.stage}`; });
      this.show(r);
    } catch (e) { clear(out).append(el("p", {class: "error", "data-testid": "steer-error", text: e.message})); }
  }

  show(r) {
    const out = clear(this.result);
    const table = (title, list) => el("table", {class: "toks"}, el("caption", {text: title}),
      ...list.map(t => el("tr", {}, el("td", {class: "tk", text: tok(t.token)}), el("td", {text: t.prob.toFixed(3)}))));
    out.append(el("div", {class: "side", "data-testid": "steer-tops"}, table("before", r.before), table(`after (${r.mode})`, r.after)));
    if (r.generation) {
      const line = (title, toks, testid) => el("div", {class: "gen", "data-testid": testid}, el("b", {text: title + ": "}),
        ...toks.map(t => el("span", {class: "gt", text: tok(t)})));
      out.append(line("before", r.generation.original, "gen-before"), line("after", r.generation.steered, "gen-after"));
    }
    if (r.graph) {
      const t = el("table", {class: "pred", "data-testid": "steer-pred"}, el("caption", {text: "logit − mean logit: change predicted by the graph (direct) vs measured"}),
        el("tr", {}, el("th", {text: "logit"}), el("th", {text: "graph"}), el("th", {text: "measured"})));
      for (const l of r.graph.logit_changes) t.append(el("tr", {}, el("td", {class: "tk", text: tok(l.token)}), el("td", {text: fmt(l.predicted_direct)}), el("td", {text: fmt(l.measured)})));
      out.append(t);
      if (r.graph.changes_outside_graph.length) out.append(el("p", {class: "hint", text: `changes at ${r.graph.changes_outside_graph.length} feature(s) outside the graph are not in the prediction`}));
    }
  }
}
