// The graph pane: nodes by layer (bottom to top: embeddings, layers, logits) and token position (left to
// right), drawn on a canvas. A static layer holds the bands, labels, faint edges and nodes; an overlay holds
// what follows the mouse (hovered and selected node's edges, neighbours coloured by signed weight, pins),
// so hover redraws only the overlay. Columns are as wide as their most crowded (layer, position) cell.
import {b64, esc, signedColor, tok} from "./util.js";

const KIND = {feature: 0, error: 1, token: 2, logit: 3, diff: 4};
const M = {left: 46, right: 12, top: 78, bottom: 86};
const FILL = ["#f6c36b", "#b8b8b8", "#8fd19e", "#b69be0", "#e08bb5"];

export function decodeView(v) {
  const n = v.nodes.id.length;
  const d = {
    raw: v, n, id: v.nodes.id, label: v.nodes.label,
    kind: b64(v.nodes.kind, Uint8Array), layer: b64(v.nodes.layer, Int32Array), pos: b64(v.nodes.pos, Int32Array),
    feature: b64(v.nodes.feature, Int32Array), act: b64(v.nodes.act, Float32Array),
    infl: b64(v.nodes.influence, Float32Array), prob: b64(v.nodes.prob, Float32Array),
    src: b64(v.edges.src, Uint32Array), tgt: b64(v.edges.tgt, Uint32Array), w: b64(v.edges.w, Float32Array),
  };
  d.index = new Map(d.id.map((x, i) => [x, i]));
  const m = d.w.length;
  // CSR adjacency both ways, and each edge's share of its target's total |input|
  const inCount = new Uint32Array(n + 1), outCount = new Uint32Array(n + 1), inAbs = new Float32Array(n);
  for (let e = 0; e < m; e++) { inCount[d.tgt[e] + 1]++; outCount[d.src[e] + 1]++; inAbs[d.tgt[e]] += Math.abs(d.w[e]); }
  for (let i = 0; i < n; i++) { inCount[i + 1] += inCount[i]; outCount[i + 1] += outCount[i]; }
  const inIdx = new Uint32Array(m), outIdx = new Uint32Array(m), fi = inCount.slice(0, n), fo = outCount.slice(0, n);
  for (let e = 0; e < m; e++) { inIdx[fi[d.tgt[e]]++] = e; outIdx[fo[d.src[e]]++] = e; }
  d.inStart = inCount; d.inIdx = inIdx; d.outStart = outCount; d.outIdx = outIdx;
  d.pct = new Float32Array(m);
  let maxPct = 0;
  for (let e = 0; e < m; e++) { d.pct[e] = d.w[e] / (inAbs[d.tgt[e]] || 1); maxPct = Math.max(maxPct, Math.abs(d.pct[e])); }
  d.maxPct = maxPct || 1;
  return d;
}

export function edgesOf(d, i) {
  const ins = [], outs = [];
  for (let k = d.inStart[i]; k < d.inStart[i + 1]; k++) ins.push(d.inIdx[k]);
  for (let k = d.outStart[i]; k < d.outStart[i + 1]; k++) outs.push(d.outIdx[k]);
  return {ins, outs};
}

export class GraphView {
  constructor(wrap, canvas, overlay, tooltip, on) {
    Object.assign(this, {wrap, canvas, overlay, tooltip, on});
    this.d = null; this.hover = -1; this.selected = -1; this.pinned = new Set(); this.marked = new Set();
    overlay.addEventListener("mousemove", ev => this.onMove(ev));
    overlay.addEventListener("mouseleave", () => this.setHover(-1));
    overlay.addEventListener("click", ev => this.onClick(ev));
    new ResizeObserver(() => { if (this.d) this.render(); }).observe(wrap);
    this.timings = {};
  }

  setData(d) { this.d = d; this.hover = -1; this.render(); }

  render() {
    const t0 = performance.now();
    this.layout();
    this.drawStatic();
    this.drawOverlay();
    this.timings.render = performance.now() - t0;
  }

  layout() {
    const d = this.d, L = d.raw.n_layers, T = d.raw.n_pos, bands = L + 2;
    const W = Math.max(300, this.wrap.clientWidth), H = Math.max(240, this.wrap.clientHeight);
    this.W = W; this.H = H; this.bands = bands;
    const band = new Int32Array(d.n);
    const cells = new Map();
    for (let i = 0; i < d.n; i++) {
      const k = d.kind[i];
      band[i] = k === KIND.token ? 0 : (k === KIND.logit || k === KIND.diff) ? L + 1 : d.layer[i] + 1;
      const key = d.pos[i] * bands + band[i];
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(i);
    }
    const units = new Float64Array(T).fill(1);
    for (const [key, list] of cells) { const p = Math.floor(key / bands); units[p] = Math.max(units[p], list.length); }
    const total = units.reduce((a, b) => a + b, 0);
    const unitPx = (W - M.left - M.right) / total;
    this.colX = new Float64Array(T + 1);
    for (let p = 0; p < T; p++) this.colX[p + 1] = this.colX[p] + units[p] * unitPx;
    this.bandH = (H - M.top - M.bottom) / bands;
    this.X = new Float32Array(d.n); this.Y = new Float32Array(d.n); this.R = new Float32Array(d.n);
    for (const [key, list] of cells) {
      const p = Math.floor(key / bands), b = key % bands;
      list.sort((a, c) => (d.kind[a] - d.kind[c]) || (d.kind[a] === KIND.logit ? d.prob[c] - d.prob[a] : d.infl[a] - d.infl[c]));
      const x0 = M.left + this.colX[p], w = this.colX[p + 1] - this.colX[p], step = w / list.length;
      const r = Math.max(1.5, Math.min(5, step / 2 - 0.5, this.bandH / 3));
      list.forEach((i, j) => { this.X[i] = x0 + (j + 0.5) * step; this.Y[i] = this.bandY(b); this.R[i] = r; });
    }
    // hit grid
    this.grid = new Map();
    for (let i = 0; i < d.n; i++) {
      const key = Math.floor(this.X[i] / 12) * 100000 + Math.floor(this.Y[i] / 12);
      if (!this.grid.has(key)) this.grid.set(key, []);
      this.grid.get(key).push(i);
    }
  }

  bandY(b) { return M.top + (this.bands - 1 - b + 0.5) * this.bandH; }

  size(c) {
    const dpr = window.devicePixelRatio || 1;
    c.width = Math.round(this.W * dpr); c.height = Math.round(this.H * dpr);
    c.style.width = this.W + "px"; c.style.height = this.H + "px";
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return ctx;
  }

  drawStatic() {
    const d = this.d, ctx = this.size(this.canvas), L = d.raw.n_layers, T = d.raw.n_pos;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, this.W, this.H);
    for (let b = 0; b < this.bands; b++) {
      if (b % 2 === 0) { ctx.fillStyle = "#f5f6f8"; ctx.fillRect(M.left, this.bandY(b) - this.bandH / 2, this.W - M.left - M.right, this.bandH); }
      ctx.fillStyle = "#667"; ctx.font = "10px sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
      const name = b === 0 ? "Emb" : b === this.bands - 1 ? "Lgt" : `L${b - 1}`;
      if (b === 0 || b === this.bands - 1 || this.bandH >= 11 || (b - 1) % 2 === 0) ctx.fillText(name, M.left - 6, this.bandY(b));
    }
    ctx.strokeStyle = "#e3e5ea"; ctx.lineWidth = 1;
    for (let p = 0; p <= T; p++) { const x = M.left + this.colX[p]; ctx.beginPath(); ctx.moveTo(x, M.top); ctx.lineTo(x, this.H - M.bottom); ctx.stroke(); }
    // prompt tokens along the bottom, rotated
    ctx.fillStyle = "#222"; ctx.font = "11px sans-serif"; ctx.textAlign = "right";
    for (let p = 0; p < T; p++) {
      const x = M.left + (this.colX[p] + this.colX[p + 1]) / 2;
      ctx.save(); ctx.translate(x, this.H - M.bottom + 8); ctx.rotate(-Math.PI / 4);
      ctx.fillText(tok(d.raw.tokens[p]).slice(0, 16), 0, 0); ctx.restore();
    }
    // faint edges, one path per sign
    for (const sign of [1, -1]) {
      ctx.beginPath();
      for (let e = 0; e < d.w.length; e++) {
        if ((d.w[e] > 0) !== (sign > 0)) continue;
        ctx.moveTo(this.X[d.src[e]], this.Y[d.src[e]]); ctx.lineTo(this.X[d.tgt[e]], this.Y[d.tgt[e]]);
      }
      const alpha = Math.max(0.012, Math.min(0.1, 150 / (d.w.length + 1)));  // many edges: fainter, not a wall
      ctx.strokeStyle = sign > 0 ? `rgba(40,90,170,${alpha})` : `rgba(190,40,40,${alpha})`; ctx.lineWidth = 0.6; ctx.stroke();
    }
    for (let k = 0; k < 5; k++) {
      ctx.beginPath();
      for (let i = 0; i < d.n; i++) if (d.kind[i] === k) this.glyph(ctx, i);
      ctx.fillStyle = FILL[k]; ctx.fill(); ctx.strokeStyle = k === KIND.error ? "#777" : "#333"; ctx.lineWidth = 0.6; ctx.stroke();
    }
    // logits on top with their probabilities
    ctx.fillStyle = "#222"; ctx.font = "11px sans-serif"; ctx.textAlign = "left";
    for (let i = 0; i < d.n; i++) {
      if (d.kind[i] !== KIND.logit && d.kind[i] !== KIND.diff) continue;
      const text = d.kind[i] === KIND.diff ? d.label[i].replace(/^output /, "") :
        `${tok(d.raw.logits[this.logitIndex(i)]?.token ?? "")} ${d.prob[i].toFixed(2)}`;
      ctx.save(); ctx.translate(this.X[i], this.Y[i] - 8); ctx.rotate(-Math.PI / 4); ctx.fillText(text.slice(0, 24), 0, 0); ctx.restore();
    }
  }

  logitIndex(i) {
    // logits are in the payload in graph order: the k-th logit node is logit k
    if (!this.logitOrder) this.logitOrder = new Map();
    if (this.logitOrder.d !== this.d) {
      this.logitOrder = new Map(); this.logitOrder.d = this.d; let k = 0;
      for (let j = 0; j < this.d.n; j++) if (this.d.kind[j] === KIND.logit) this.logitOrder.set(j, k++);
    }
    return this.logitOrder.get(i);
  }

  glyph(ctx, i, grow = 0) {
    const x = this.X[i], y = this.Y[i], r = this.R[i] + grow, k = this.d.kind[i];
    if (k === KIND.feature) { ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 2 * Math.PI); }
    else if (k === KIND.error) { ctx.moveTo(x, y - r - 1); ctx.lineTo(x + r + 1, y); ctx.lineTo(x, y + r + 1); ctx.lineTo(x - r - 1, y); ctx.closePath(); }
    else if (k === KIND.diff) { ctx.moveTo(x, y - r - 2); ctx.lineTo(x + r + 2, y + r); ctx.lineTo(x - r - 2, y + r); ctx.closePath(); }
    else ctx.rect(x - r, y - r, 2 * r, 2 * r);
  }

  // colours scale with the largest edge of this node, so that every node's neighbours show their signs
  localMax(i) {
    const d = this.d, {ins, outs} = edgesOf(d, i);
    let m = 0;
    for (const e of ins.concat(outs)) m = Math.max(m, Math.abs(d.pct[e]));
    return m || 1;
  }

  drawEdges(ctx, i, alpha, colorNeighbours) {
    const d = this.d, {ins, outs} = edgesOf(d, i), max = this.localMax(i);
    for (const e of ins.concat(outs)) {
      const a = Math.abs(d.pct[e]) / max;
      ctx.beginPath(); ctx.moveTo(this.X[d.src[e]], this.Y[d.src[e]]); ctx.lineTo(this.X[d.tgt[e]], this.Y[d.tgt[e]]);
      ctx.strokeStyle = signedColor(d.pct[e], max * 0.8); ctx.globalAlpha = alpha; ctx.lineWidth = 0.5 + 3 * Math.sqrt(a); ctx.stroke();
    }
    ctx.globalAlpha = 1;
    if (!colorNeighbours) return;
    for (const e of ins.concat(outs)) {
      const j = d.src[e] === i ? d.tgt[e] : d.src[e];
      ctx.beginPath(); this.glyph(ctx, j, 1);
      ctx.fillStyle = signedColor(d.pct[e], max * 0.8); ctx.fill(); ctx.strokeStyle = "#222"; ctx.lineWidth = 0.8; ctx.stroke();
    }
  }

  drawOverlay() {
    const t0 = performance.now();
    const d = this.d, ctx = this.size(this.overlay);
    if (!d) return;
    ctx.clearRect(0, 0, this.W, this.H);
    if (this.selected >= 0) this.drawEdges(ctx, this.selected, 0.9, true);
    if (this.hover >= 0 && this.hover !== this.selected) this.drawEdges(ctx, this.hover, 0.55, this.selected < 0);
    for (const i of this.marked) { ctx.beginPath(); ctx.arc(this.X[i], this.Y[i], this.R[i] + 5, 0, 2 * Math.PI); ctx.strokeStyle = "#e0a800"; ctx.lineWidth = 2.5; ctx.stroke(); }
    for (const id of this.pinned) {
      const i = d.index.get(id); if (i === undefined) continue;
      ctx.beginPath(); this.glyph(ctx, i, 1.5); ctx.strokeStyle = "#111"; ctx.lineWidth = 2.2; ctx.stroke();
    }
    if (this.selected >= 0) { const i = this.selected; ctx.beginPath(); ctx.arc(this.X[i], this.Y[i], this.R[i] + 4, 0, 2 * Math.PI); ctx.strokeStyle = "#d0006f"; ctx.lineWidth = 2; ctx.stroke(); }
    if (this.hover >= 0) { const i = this.hover; ctx.beginPath(); ctx.setLineDash([3, 2]); ctx.arc(this.X[i], this.Y[i], this.R[i] + 6, 0, 2 * Math.PI); ctx.strokeStyle = "#d0006f"; ctx.lineWidth = 1.5; ctx.stroke(); ctx.setLineDash([]); }
    this.timings.overlay = performance.now() - t0;
  }

  nodeAt(x, y) {
    let best = -1, bestD = 12 * 12;
    const gx = Math.floor(x / 12), gy = Math.floor(y / 12);
    for (let a = -1; a <= 1; a++) for (let b = -1; b <= 1; b++) {
      for (const i of this.grid.get((gx + a) * 100000 + gy + b) || []) {
        const dd = (this.X[i] - x) ** 2 + (this.Y[i] - y) ** 2;
        if (dd < bestD) { bestD = dd; best = i; }
      }
    }
    return best;
  }

  local(ev) { const r = this.overlay.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; }

  onMove(ev) {
    if (!this.d) return;
    const [x, y] = this.local(ev);
    this.setHover(this.nodeAt(x, y));
    this.timings.hover = performance.now() - ev.timeStamp;
  }

  setHover(i) {
    if (i === this.hover) return;
    this.hover = i;
    this.drawOverlay();
    const t = this.tooltip;
    if (i < 0) { t.hidden = true; return; }
    t.textContent = this.nodeTitle(i);
    t.hidden = false;
    t.style.left = Math.min(this.W - 220, this.X[i] + 12) + "px";
    t.style.top = Math.max(0, this.Y[i] - 30) + "px";
  }

  nodeTitle(i) {
    const d = this.d, k = d.kind[i];
    if (k === KIND.feature) return `L${d.layer[i]}/${d.feature[i]} @${d.pos[i]} ${tok(d.raw.tokens[d.pos[i]])} · act ${d.act[i].toFixed(2)} · ${d.label[i] || "(no label)"}`;
    return tok(d.label[i]);
  }

  onClick(ev) {
    if (!this.d) return;
    const [x, y] = this.local(ev);
    const i = this.nodeAt(x, y);
    this.on.click(i, ev.ctrlKey || ev.metaKey);
    this.timings.click = performance.now() - ev.timeStamp;
  }

  select(i) { this.selected = i; this.drawOverlay(); }

  screenPos(id) {
    const i = this.d?.index.get(id);
    if (i === undefined) return null;
    const r = this.overlay.getBoundingClientRect();
    return {x: r.left + this.X[i], y: r.top + this.Y[i]};
  }

  toPNG() {
    const c = document.createElement("canvas");
    c.width = this.canvas.width; c.height = this.canvas.height;
    const ctx = c.getContext("2d");
    ctx.drawImage(this.canvas, 0, 0); ctx.drawImage(this.overlay, 0, 0);
    return new Promise(res => c.toBlob(res, "image/png"));
  }

  // the same picture as SVG text (every string escaped)
  toSVG() {
    const d = this.d, L = d.raw.n_layers, T = d.raw.n_pos, out = [];
    const f = x => x.toFixed(1);
    out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${this.W}" height="${this.H}" viewBox="0 0 ${this.W} ${this.H}" font-family="sans-serif">`);
    out.push(`<title>${esc(d.raw.prompt)}</title><rect width="100%" height="100%" fill="#fff"/>`);
    for (let b = 0; b < this.bands; b++) {
      const name = b === 0 ? "Emb" : b === this.bands - 1 ? "Lgt" : `L${b - 1}`;
      out.push(`<text x="${M.left - 6}" y="${f(this.bandY(b) + 3)}" font-size="10" text-anchor="end" fill="#667">${name}</text>`);
    }
    for (let p = 0; p < T; p++) {
      const x = M.left + (this.colX[p] + this.colX[p + 1]) / 2, y = this.H - M.bottom + 8;
      out.push(`<text transform="translate(${f(x)},${f(y)}) rotate(-45)" font-size="11" text-anchor="end">${esc(tok(d.raw.tokens[p]).slice(0, 16))}</text>`);
    }
    const focus = this.selected >= 0 ? this.selected : -1;
    const maxEdges = 20000;
    out.push(`<g stroke-width="0.6" opacity="${Math.max(0.03, Math.min(0.25, 400 / (d.w.length + 1))).toFixed(3)}">`);
    for (let e = 0; e < Math.min(d.w.length, maxEdges); e++) {
      out.push(`<line x1="${f(this.X[d.src[e]])}" y1="${f(this.Y[d.src[e]])}" x2="${f(this.X[d.tgt[e]])}" y2="${f(this.Y[d.tgt[e]])}" stroke="${d.w[e] > 0 ? "#285aaa" : "#be2828"}"/>`);
    }
    out.push(`</g>`);
    if (focus >= 0) {
      const {ins, outs} = edgesOf(d, focus), max = this.localMax(focus);
      for (const e of ins.concat(outs)) {
        out.push(`<line x1="${f(this.X[d.src[e]])}" y1="${f(this.Y[d.src[e]])}" x2="${f(this.X[d.tgt[e]])}" y2="${f(this.Y[d.tgt[e]])}" stroke="${signedColor(d.pct[e], max * 0.8)}" stroke-width="${f(0.5 + 3 * Math.sqrt(Math.abs(d.pct[e]) / max))}"/>`);
      }
    }
    for (let i = 0; i < d.n; i++) {
      const k = d.kind[i], x = f(this.X[i]), y = f(this.Y[i]), r = this.R[i];
      const title = `<title>${esc(this.nodeTitle(i))}</title>`;
      const stroke = this.pinned.has(d.id[i]) ? `stroke="#111" stroke-width="2"` : `stroke="#333" stroke-width="0.6"`;
      if (k === KIND.feature) out.push(`<circle cx="${x}" cy="${y}" r="${f(r)}" fill="${FILL[k]}" ${stroke}>${title}</circle>`);
      else out.push(`<rect x="${f(this.X[i] - r)}" y="${f(this.Y[i] - r)}" width="${f(2 * r)}" height="${f(2 * r)}" fill="${FILL[k]}" ${stroke}${k === KIND.error ? ` transform="rotate(45 ${x} ${y})"` : ""}>${title}</rect>`);
      if (k === KIND.logit || k === KIND.diff) {
        const text = k === KIND.diff ? d.label[i] : `${tok(d.raw.logits[this.logitIndex(i)]?.token ?? "")} ${d.prob[i].toFixed(2)}`;
        out.push(`<text transform="translate(${x},${f(this.Y[i] - 8)}) rotate(-45)" font-size="11">${esc(text)}</text>`);
      }
    }
    out.push(`</svg>`);
    return out.join("\n");
  }
}
