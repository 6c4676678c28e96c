// The subgraph pane: pinned nodes and named supernodes, laid out by (position, layer) and draggable, with
// the edges between groups summed, the subgraph's scores, and supernode suggestions to accept or reject.
import {api} from "./api.js";
import {clear, el, fmt, signedColor, tok} from "./util.js";

const NS = "http://www.w3.org/2000/svg";

export class SubgraphPane {
  constructor(app) {
    this.app = app;
    this.list = document.getElementById("sub-list");
    this.svg = document.getElementById("sub-svg");
    this.scoresEl = document.getElementById("sub-scores");
    this.sugg = document.getElementById("suggestions");
    this.info = {nodes: {}, edges: []};
    this.seq = 0;
    document.getElementById("group-btn").onclick = () => this.groupChecked();
    document.getElementById("suggest-btn").onclick = () => this.suggest();
    document.getElementById("clear-pins").onclick = () => { const s = this.app.state; s.pinned = []; s.supernodes = []; this.app.changed(); };
  }

  groupOf(id) { return this.app.state.supernodes.find(s => s.members.includes(id)); }

  async refresh() {
    const seq = ++this.seq, st = this.app.state;
    try {
      this.info = await api.scores(this.app.name, st.pinned);
    } catch (e) { this.scoresEl.textContent = e.message; return; }
    if (seq !== this.seq) return;
    const s = this.info;
    this.scoresEl.textContent = st.pinned.length
      ? `pinned ${st.pinned.length} (${s.n_features} features) · replacement ${fmt(s.replacement)} · completeness ${fmt(s.completeness)}`
      : "pin nodes to build a subgraph";
    this.renderList();
    this.renderSvg();
  }

  label(id) {
    const n = this.info.nodes[id];
    const i = this.app.d?.index.get(id);
    if (i !== undefined && this.app.d.kind[i] === 0) return this.app.d.label[i] || id;
    return n ? (n.label || id) : id;
  }

  renderList() {
    const st = this.app.state, ul = clear(this.list);
    for (const sn of st.supernodes) {
      const name = el("input", {class: "sn-name", "data-testid": "sn-name", value: sn.name, maxlength: 200});
      name.addEventListener("keydown", ev => ev.stopPropagation());
      name.addEventListener("change", () => { sn.name = name.value; this.app.changed(); });
      ul.append(el("div", {class: "sn-row", "data-testid": "supernode"}, el("span", {text: "▣ "}), name,
        el("button", {"data-testid": "ungroup", text: "ungroup", onclick: () => {
          st.supernodes = st.supernodes.filter(x => x !== sn); this.app.changed(); }}),
        el("div", {class: "members"}, ...sn.members.map(m => el("span", {class: "member", text: tok(this.label(m)).slice(0, 40)})))));
    }
    for (const id of st.pinned) {
      if (this.groupOf(id)) continue;
      ul.append(el("div", {class: "pin-row", "data-testid": "pinned"},
        el("input", {type: "checkbox", class: "pin-check", "data-testid": "pin-check", "data-id": id}),
        el("span", {class: "pin-label", text: ` ${id} · ${tok(this.label(id)).slice(0, 50)} `, onclick: () => { const i = this.app.d.index.get(id); if (i !== undefined) this.app.select(i); }}),
        el("button", {text: "×", title: "unpin", onclick: () => this.app.togglePin(id)})));
    }
  }

  groupChecked() {
    const st = this.app.state;
    const ids = [...this.list.querySelectorAll(".pin-check:checked")].map(c => c.dataset.id);
    if (ids.length < 1) { this.app.status("check pinned nodes to group them"); return; }
    this.addSupernode(`group ${st.supernodes.length + 1}`, ids);
  }

  addSupernode(name, ids) {
    const st = this.app.state;
    for (const sn of st.supernodes) sn.members = sn.members.filter(m => !ids.includes(m));
    st.supernodes = st.supernodes.filter(sn => sn.members.length);
    st.supernodes.push({id: `sn${Date.now().toString(36)}${st.supernodes.length}`, name, members: ids});
    this.app.changed();
  }

  items() {
    const st = this.app.state, d = this.app.d, T = d?.raw.n_pos || 1, L = d?.raw.n_layers || 1;
    const where = id => {
      const n = this.info.nodes[id];
      return n ? [(n.pos + 0.5) / T, 1 - (n.layer + 1.5) / (L + 2)] : [0.5, 0.5];
    };
    const out = [];
    for (const sn of st.supernodes) {
      const ps = sn.members.map(where);
      const def = [ps.reduce((a, p) => a + p[0], 0) / ps.length, ps.reduce((a, p) => a + p[1], 0) / ps.length];
      out.push({id: sn.id, text: sn.name, members: sn.members, pos: st.layout[sn.id] || def, group: true});
    }
    for (const id of st.pinned) if (!this.groupOf(id)) out.push({id, text: this.label(id), members: [id], pos: st.layout[id] || where(id)});
    // items of one (position, layer) would sit on each other: spread those not placed by hand
    const cells = new Map();
    for (const it of out) {
      if (st.layout[it.id]) continue;
      const key = `${it.pos[0].toFixed(3)},${it.pos[1].toFixed(3)}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(it);
    }
    for (const list of cells.values()) {
      const n = list.length, step = n > 1 ? Math.min(0.22, 1 / (n - 1)) : 0, span = step * (n - 1);
      const cx = Math.max(span / 2, Math.min(1 - span / 2, list[0].pos[0]));
      list.forEach((it, k) => {
        it.pos = [cx - span / 2 + k * step, Math.max(0, Math.min(1, it.pos[1] + (k % 2) * 0.09))];
      });
    }
    return out;
  }

  renderSvg() {
    const svg = this.svg, W = svg.clientWidth || 500, H = svg.clientHeight || 260;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const items = this.items(), of = new Map();
    items.forEach(it => it.members.forEach(m => of.set(m, it)));
    const sums = new Map();
    for (const [s, t, w] of this.info.edges) {
      const a = of.get(s), b = of.get(t);
      if (!a || !b || a === b) continue;
      const k = a.id + "\u0000" + b.id;
      sums.set(k, (sums.get(k) || 0) + w);
    }
    const max = Math.max(1e-9, ...[...sums.values()].map(Math.abs));
    const px = it => [20 + it.pos[0] * (W - 140), 16 + it.pos[1] * (H - 40)];
    const lines = [];
    for (const [k, w] of sums) {
      const [a, b] = k.split("\u0000").map(id => items.find(it => it.id === id));
      const line = document.createElementNS(NS, "line");
      line.setAttribute("stroke", signedColor(w, max)); line.setAttribute("stroke-width", (0.8 + 5 * Math.abs(w) / max).toFixed(2));
      line.setAttribute("opacity", 0.8);
      const title = document.createElementNS(NS, "title"); title.textContent = `${fmt(w)} (summed)`; line.append(title);
      svg.append(line); lines.push([line, a, b]);
    }
    const place = () => lines.forEach(([line, a, b]) => {
      const [x1, y1] = px(a), [x2, y2] = px(b);
      line.setAttribute("x1", x1 + 55); line.setAttribute("y1", y1 + 10); line.setAttribute("x2", x2 + 55); line.setAttribute("y2", y2 + 10);
    });
    for (const it of items) {
      const g = document.createElementNS(NS, "g");
      g.setAttribute("class", it.group ? "sg-node sg-group" : "sg-node"); g.setAttribute("data-testid", "sg-node");
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("width", 110); r.setAttribute("height", 20); r.setAttribute("rx", it.group ? 8 : 3);
      r.setAttribute("fill", it.group ? "#fde9c8" : "#fff"); r.setAttribute("stroke", "#444");
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", 5); t.setAttribute("y", 14); t.setAttribute("font-size", 11);
      t.textContent = tok(it.text).slice(0, 17) + (it.group ? ` (${it.members.length})` : "");
      const title = document.createElementNS(NS, "title"); title.textContent = it.text;
      g.append(r, t, title);
      const setPos = () => { const [x, y] = px(it); g.setAttribute("transform", `translate(${x},${y})`); };
      setPos();
      svg.append(g);
      d3.select(g).call(d3.drag()
        .on("drag", ev => {
          it.pos = [Math.max(0, Math.min(1, (ev.x - 20) / (W - 140))), Math.max(0, Math.min(1, (ev.y - 16) / (H - 40)))];
          setPos(); place();
        })
        .on("end", () => { this.app.state.layout[it.id] = it.pos; this.app.changed(false); }));
    }
    place();
  }

  async suggest() {
    const st = this.app.state;
    clear(this.sugg).append(el("p", {class: "hint", text: "looking for features that play the same role…"}));
    let r;
    try {
      r = await api.suggest(this.app.name, st.pinned, st.supernodes.map(s => s.members).concat(st.rejected));
    } catch (e) { clear(this.sugg).append(el("p", {class: "error", text: e.message})); return; }
    clear(this.sugg);
    if (!r.suggestions.length) { this.sugg.append(el("p", {class: "hint", text: "no suggestion among the pinned features"})); return; }
    r.suggestions.forEach((s, k) => {
      const row = el("div", {class: "suggestion", "data-testid": "suggestion"},
        el("b", {text: `${s.members.length} features · score ${fmt(s.score, 2)} `}),
        el("span", {class: "why", text: s.why}),
        el("div", {class: "members"}, ...s.members.map(m => el("span", {class: "member", text: tok(this.label(m)).slice(0, 30)}))),
        el("button", {"data-testid": "accept", text: "Accept", onclick: () => { row.remove(); this.addSupernode(`suggested ${k + 1}`, s.members); }}),
        el("button", {"data-testid": "reject", text: "Reject", onclick: () => { row.remove(); st.rejected.push(s.members); this.app.changed(false); }}));
      this.sugg.append(row);
    });
  }

  toSVG() {
    const copy = this.svg.cloneNode(true);
    const r = this.svg.getBoundingClientRect();
    copy.setAttribute("width", Math.round(r.width)); copy.setAttribute("height", Math.round(r.height));
    copy.setAttribute("font-family", "sans-serif");
    const bg = document.createElementNS(NS, "rect");
    bg.setAttribute("width", "100%"); bg.setAttribute("height", "100%"); bg.setAttribute("fill", "#fff");
    copy.insertBefore(bg, copy.firstChild);
    return new XMLSerializer().serializeToString(copy);
  }

  // the SVG drawn at twice its size into a canvas (for slides and papers that want pixels)
  toPNG() {
    const r = this.svg.getBoundingClientRect(), scale = 2;
    const url = URL.createObjectURL(new Blob([this.toSVG()], {type: "image/svg+xml"}));
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const c = document.createElement("canvas");
        c.width = Math.round(r.width * scale); c.height = Math.round(r.height * scale);
        c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
        URL.revokeObjectURL(url);
        c.toBlob(resolve, "image/png");
      };
      img.onerror = () => { URL.revokeObjectURL(url); reject(new Error("could not draw the subgraph")); };
      img.src = url;
    });
  }
}
