// The node pane's "Why did this head attend here" section: the node's cross-position edges split by the attention
// head that carried them (head loadings) and that head's score decomposed into (query, key) component terms,
// from GET /api/graphs/{name}/qk/{node_id} (the graph's side file GRAPH.qk.json, written by `cltrace trace --qk`
// or `cltrace qk`). Every text reaches the page through textContent (util.el), never innerHTML.
import {clear, el, fmt} from "./util.js";

const STYLE = `
.qk { margin-top: 8px; border-top: 1px solid #eee; padding-top: 4px; }
.qk h4 { margin: 4px 0 2px; font-size: 12px; }
.qk-edge { margin: 4px 0 6px; }
.qk-head { margin-left: 8px; font-size: 11px; }
.qk-list { list-style: none; margin: 1px 0 1px 8px; padding: 0; font-family: monospace; font-size: 11px; }
`;

function ensureStyle() {
  if (document.getElementById("qk-style")) return;
  document.head.append(el("style", {id: "qk-style", text: STYLE}));
}

const sgn = v => (v >= 0 ? "+" : "") + fmt(v);

export function qkSection(app, nodeId) {
  ensureStyle();
  const body = el("div", {"data-testid": "qk-body"}, el("p", {class: "hint", text: "loading attention (QK) results…"}));
  const box = el("div", {class: "qk", "data-testid": "qk"}, el("h4", {text: "Why did this head attend here (QK)"}), body);
  (async () => {
    let data;
    try {
      const r = await fetch(`/api/graphs/${encodeURIComponent(app.name)}/qk/${encodeURIComponent(nodeId)}`);
      data = await r.json();
      if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
    } catch (e) { clear(body).append(el("p", {class: "hint", "data-testid": "qk-error", text: e.message})); return; }
    render(body, data, nodeId);
  })();
  return box;
}

function render(body, data, nodeId) {
  clear(body);
  if (!data.edges.length) {
    body.append(el("p", {class: "hint", "data-testid": "qk-none", text: data.note || `no QK results for ${nodeId}`}));
    return;
  }
  for (const e of data.edges) {
    const div = el("div", {class: "qk-edge", "data-testid": "qk-edge"},
      el("div", {text: `${e.source} → ${e.target}: edge ${sgn(e.edge)} (heads ${sgn(e.sum_loadings)}, direct ${sgn(e.direct)})`}));
    for (const h of e.heads) {
      const q = h.qk, s = q.shares;
      const cap = q.softcap ? `, before the soft-cap ${q.softcap}` : "";
      div.append(el("div", {class: "qk-head", "data-testid": "qk-head"},
        el("b", {text: `head ${h.layer}.${h.head}`}),
        el("span", {text: ` carries ${sgn(h.part)} from position ${h.key_pos}; score ${sgn(q.score)}${cap}, attention ${fmt(q.pattern, 3)}`}),
        el("div", {class: "hint", text: `|terms| by kind: feature ${fmt(s.feature, 2)}, error ${fmt(s.error, 2)}, token ${fmt(s.token, 2)}, constant ${fmt(s.constant, 2)}`})));
      const list = (title, rows, text) => {
        const ul = el("ul", {class: "qk-list"});
        for (const r of rows.slice(0, 5)) ul.append(el("li", {text: text(r)}));
        div.append(el("div", {class: "qk-head", text: title}), ul);
      };
      list("top (query × key) terms", q.top_pairs, t => `${sgn(t.term)}  ${t.query} × ${t.key}`);
      list("query side", q.top_query, t => `${sgn(t.value)}  ${t.component}`);
      list("key side", q.top_key, t => `${sgn(t.value)}  ${t.component}`);
      list("features, query side", q.top_query_features || [], t => `${sgn(t.value)}  ${t.component}`);
      list("features, key side", q.top_key_features || [], t => `${sgn(t.value)}  ${t.component}`);
    }
    body.append(div);
  }
}
