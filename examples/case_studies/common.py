"""What every case study shares: trace and prune a prompt, describe its features, group them into supernodes,
inhibit each supernode and compare the change with the graph's prediction, save the labeled subgraph for
`cltrace serve`, and write the page.

Everything goes through the library's API (cltrace.attribute / prune / scores / intervene, FeatureDB, the
viewer's GraphStore and ViewState). A case study is a function `run(study) -> dict` in its own module; its
`main()` loads the default model and the demo CLT and calls it. The tests call the same functions on a tiny
random model (tests/test_case_studies.py).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cltrace
from cltrace.attribution.export import node_ids
from cltrace.attribution.prune import influence, normalize_rows
from cltrace.features.effects import decoder_write, frozen_final_norm, listable_tokens
from cltrace.interventions import Intervention
from cltrace.interventions.graph import direct_prediction, total_prediction
from cltrace.models.predict import predict
from cltrace.viewer.plot import plot_graph
from cltrace.viewer.schemas import Supernode, ViewState
from cltrace.viewer.store import GraphStore

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "case-studies"
RUNS = ROOT / "runs" / "case-studies"
Node = tuple[int, int, int]  # (layer, pos, feature), as everywhere in cltrace


@dataclass
class Study:
    """The model, its transcoders, an optional feature database, and where pages and graphs go."""

    model: cltrace.ModelAdapter
    tc: cltrace.Transcoder
    db: cltrace.FeatureDB | None = None
    docs: Path = DOCS  # pages: docs/case-studies/<name>.md, figures in docs/case-studies/<name>/
    runs: Path = RUNS  # saved subgraphs: runs/case-studies/<name>/ (what `cltrace serve` opens)
    max_features: int = 200  # feature nodes per graph (the most influential, as `cltrace trace --max-features`)
    grid: int = 100  # addition: operands 0..grid-1
    batch: int = 250  # prompts per forward pass in batched sweeps
    transcoders: str = "runs/demo/clt"  # how the page names them
    features_path: str = ""
    notes: list[str] = field(default_factory=list)

    def figures(self, name: str) -> Path:
        d = self.docs / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run_dir(self, name: str) -> Path:
        d = self.runs / name
        d.mkdir(parents=True, exist_ok=True)
        return d


# ---------------------------------------------------------------------- predictions and graphs
def predictions(study: Study, prompts: list[str], top: int = 5) -> list[dict]:
    """The model's top next tokens for each prompt (what `cltrace predict` prints)."""
    return [{"prompt": p, "top": predict(study.model, p, top=top)} for p in prompts]


def prediction_table(rows: list[dict]) -> list[str]:
    out = ["| prompt | top 5 next tokens (probability) |", "|---|---|"]
    for r in rows:
        toks = ", ".join(f"`{t['token']!r}` {t['prob']:.3f}" for t in r["top"])
        out.append(f"| `{r['prompt']!r}` | {toks} |")
    return out


@dataclass
class Traced:
    graph: cltrace.Graph
    pruned: cltrace.PruneResult
    scores: tuple[float, float]  # (replacement, completeness), unpruned
    pruned_scores: tuple[float, float]
    influence: torch.Tensor  # [N] each node's influence on the logits (prune's node influence)
    seconds: float


def trace(study: Study, prompt: str, targets: list | None = None) -> Traced:
    t0 = time.perf_counter()
    g = cltrace.attribute(study.model, study.tc, prompt, max_feature_nodes=study.max_features, targets=targets)
    pr = cltrace.prune(g)
    inf = influence(normalize_rows(g.edges.float()), g.rows, g.logit_weights())
    return Traced(g, pr, cltrace.scores(g), cltrace.scores(g, pr), inf, time.perf_counter() - t0)


def top_features(t: Traced, n: int, positions: set[int] | None = None) -> list[int]:
    """Indices of the n most influential feature nodes that pruning kept (at `positions` if given)."""
    g, nf = t.graph, t.graph.n_features
    order = t.influence[:nf].argsort(descending=True).tolist()
    out = [i for i in order if t.pruned.node_mask[i] and (positions is None or int(g.features[i, 1]) in positions)]
    return out[:n]


def node_key(g: cltrace.Graph, i: int) -> Node:
    layer, pos, f = g.features[i].tolist()
    return layer, pos, f


def logit_slot(g: cltrace.Graph, token_id: int) -> int | None:
    ids = g.logit_tokens.tolist()
    return ids.index(token_id) if token_id in ids else None


def direct_to_logit(g: cltrace.Graph, i: int, slot: int) -> float:
    """Feature node i's direct edge into logit node `slot` (logit − mean logit units)."""
    row = (g.rows == g.logit_index(slot)).nonzero()
    return float(g.edges[int(row[0]), i]) if row.numel() else 0.0


# ---------------------------------------------------------------------- what a feature is
def final_scale(study: Study, prompt: str) -> float:
    """The final norm's 1/rms at the prompt's last position: the linear map output effects are read through."""
    with torch.no_grad():
        tr = study.model.forward(study.model.tokenize(prompt), compute_logits=False)
    return float(tr.frozen.scales["final"][0, -1])


def promoted_tokens(study: Study, layer: int, feature: int, scale: float, n: int = 4) -> list[tuple[str, float]]:
    """The tokens the feature's last decoder write promotes most, through the final norm frozen at `scale`
    (the dashboard's "promoted tokens", computed from the weights for this one feature)."""
    m = study.model
    w = decoder_write(study.tc, layer)[feature : feature + 1].to(m.device)  # [1, D]
    with torch.no_grad():
        eff = (frozen_final_norm(m, w, scale) @ m.W_U.float().T)[0]  # [V]
    eff[~listable_tokens(m).to(eff.device)] = -float("inf")
    v, i = eff.topk(n)
    return [(m.tokenizer.decode([int(t)]), float(x)) for x, t in zip(v, i)]


def describe(study: Study, layer: int, feature: int, scale: float) -> dict:
    """A feature's label and evidence: the database's label and top contexts when there is a database, and the
    tokens its decoder promotes (from the weights) always."""
    out = {"id": f"{layer}:{feature}", "label": "", "contexts": [], "frequency": None,
           "promotes": promoted_tokens(study, layer, feature, scale)}
    if study.db is not None:
        card = study.db.feature(layer, feature)
        out["label"] = card.label
        out["frequency"] = card.frequency
        for ex in card.top[:3]:
            toks = list(ex.tokens)
            toks[ex.center] = f"[[{toks[ex.center]}]]"
            out["contexts"].append("".join(toks[max(0, ex.center - 8): ex.center + 3]).replace("\n", "⏎"))
    if not out["label"]:
        out["label"] = "→ " + "/".join(repr(t) for t, _ in out["promotes"][:2])
    return out


def feature_table(study: Study, g: cltrace.Graph, members: dict[str, list[int]], scale: float,
                  inf: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """Markdown rows describing each supernode's member features, and "L:F" -> label for the viewer."""
    rows = ["| supernode | feature @ token | activation | influence | label (feature DB) | promotes (decoder) | "
            "top contexts (DB) |", "|---|---|---:|---:|---|---|---|"]
    labels = {}
    for name, idx in members.items():
        for i in idx:
            layer, pos, f = node_key(g, i)
            d = describe(study, layer, f, scale)
            labels[d["id"]] = f"{name}: {d['label']}"
            prom = ", ".join(f"`{t!r}`" for t, _ in d["promotes"][:3])
            ctx = " · ".join(f"`{c}`" for c in d["contexts"][:2]) or "—"
            rows.append(f"| {name} | {layer}:{f} @ `{g.tokens[pos]!r}` | {float(g.activations[i]):.2f} | "
                        f"{float(inf[i]):.4f} | {esc(d['label'])} | {prom} | {esc(ctx)} |")
    return rows, labels


def esc(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------------- supernode interventions
def steer_supernode(study: Study, g: cltrace.Graph, members: list[int], factor: float, answer_id: int,
                    watch: dict[str, list[int]] | None = None) -> dict:
    """Scale a supernode's features by `factor` at their own positions, in the local replacement model
    (constrained) and in the real model (free), with `cltrace.intervene`; next to the graph's predictions of
    the answer's logit change (direct: its edges alone; total: along every path of the graph, features
    responding linearly). Values are logit − mean logit, the quantity a graph's logit node holds."""
    keys = [node_key(g, i) for i in members]
    ivs = [Intervention(layer=la, pos=p, feature=f, value=factor, op="scale") for la, p, f in keys]
    changes = {k: (factor - 1.0) * float(g.activations[i]) for k, i in zip(keys, members)}
    slot = logit_slot(g, answer_id)
    row = g.n_features + slot if slot is not None else None
    out = {"factor": factor, "n_features": len(keys),
           "graph_direct": float(direct_prediction(g, changes)[row]) if row is not None else None,
           "graph_total": float(total_prediction(g, changes)[row]) if row is not None else None}
    watch_refs = {name: [f"{node_key(g, i)[0]}:{node_key(g, i)[2]}@{node_key(g, i)[1]}" for i in idx]
                  for name, idx in (watch or {}).items()}
    flat = [r for refs in watch_refs.values() for r in refs]
    for mode in ("constrained", "free"):
        res = cltrace.intervene(study.model, study.tc, None, ivs, mode=mode, graph=g, watch=flat or None, top=5)
        before = {t["id"]: t for t in res.token_changes}
        measured = next((x["measured"] for x in res.graph["logit_changes"] if x["id"] == answer_id), None)
        ans = before.get(answer_id)
        out[mode] = {"measured": measured,
                     "p_before": ans["prob_before"] if ans else None,
                     "p_after": ans["prob_after"] if ans else answer_prob(study, res, answer_id),
                     "top_after": [(t["token"], t["prob"]) for t in res.logits_after[:3]]}
        if mode == "constrained" and flat:
            acts = {(r["layer"], r["feature"], r["pos"]): (r["act_before"], r["act_after"]) for r in res.features}
            out["downstream"] = {}
            for name, refs in watch_refs.items():
                b = a = 0.0
                for ref in refs:
                    lf, p = ref.split("@")
                    la, f = (int(x) for x in lf.split(":"))
                    b0, a0 = acts[(la, f, int(p))]
                    b, a = b + b0, a + a0
                out["downstream"][name] = a / b if b else None
    return out


def answer_prob(study: Study, res, answer_id: int) -> float | None:
    for t in res.logits_after:
        if t["id"] == answer_id:
            return t["prob"]
    return None


def steering_table(results: dict[str, list[dict]], answer: str) -> list[str]:
    rows = [f"| supernode | × | graph direct | graph total | constrained measured | constrained p({answer}) | "
            f"free measured | free p({answer}) | free top after | downstream supernodes' activation (constrained, "
            "after/before) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, rs in results.items():
        for r in rs:
            c, f = r["constrained"], r["free"]
            down = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("downstream") or {}).items() if v is not None) or "—"
            top = ", ".join(f"`{t!r}` {p:.2f}" for t, p in f["top_after"])
            rows.append(f"| {name} | {r['factor']:g} | {fmt(r['graph_direct'])} | {fmt(r['graph_total'])} | "
                        f"{fmt(c['measured'])} | {fmtp(c['p_before'])} → {fmtp(c['p_after'])} | "
                        f"{fmt(f['measured'])} | {fmtp(f['p_before'])} → {fmtp(f['p_after'])} | {top} | {down} |")
    return rows


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def fmtp(x: float | None) -> str:
    return "<top-10" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------- saving and drawing
def save_subgraph(study: Study, name: str, g: cltrace.Graph, supernodes: dict[str, list[int]],
                  labels: dict[str, str], extra_pins: list[int] = ()) -> Path:
    """Write the graph and its viewer state (pinned nodes, named supernodes, labels, layout) into
    runs/case-studies/<name>/, the folder `cltrace serve` opens. Returns the graph file."""
    folder = study.run_dir(name)
    g.meta["feature_labels"] = dict(labels)
    store = GraphStore(folder)
    path = store.save_graph(g, name)
    ids = node_ids(g)
    pinned = [ids[i] for idx in supernodes.values() for i in idx] + [ids[i] for i in extra_pins]
    sns = [Supernode(id=f"sn{k}", name=sn, members=[ids[i] for i in idx])
           for k, (sn, idx) in enumerate(supernodes.items()) if idx]
    layout = {}
    for k, idx in enumerate(supernodes.values()):
        if idx:
            pos = sum(int(g.features[i, 1]) for i in idx) / len(idx)
            layer = sum(int(g.features[i, 0]) for i in idx) / len(idx)
            layout[f"sn{k}"] = (pos / max(1, g.n_pos - 1), 1.0 - (layer + 1) / (g.n_layers + 2))
    state = ViewState(pinned=list(dict.fromkeys(pinned)), supernodes=sns, labels=labels, layout=layout,
                      clicked=pinned[0] if pinned else "")
    store.write_state(name, state.model_dump())
    return path


def draw_graph(study: Study, name: str, t: Traced, title: str) -> Path:
    path = plot_graph(t.graph, t.pruned, study.figures(name) / "graph.png", max_edges=300, title=title)
    return small_png(path)


def small_png(path: Path, width: int = 1400, colours: int = 64) -> Path:
    """Shrink a PNG for the repository: at most `width` pixels wide, a palette of `colours` colours."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im.quantize(colours).save(path, optimize=True)
    return path


def draw_supernodes(study: Study, name: str, g: cltrace.Graph, supernodes: dict[str, list[int]], answer_id: int,
                    title: str, file: str = "supernodes.png") -> Path:
    """The paper's supernode diagram: each supernode at its mean (position, layer), the summed direct edges
    between supernodes and into the answer's logit (blue excites, red inhibits; width ∝ |weight|)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, idx in supernodes.items() if idx]
    xy = {n: (sum(int(g.features[i, 1]) for i in supernodes[n]) / len(supernodes[n]),
              sum(int(g.features[i, 0]) for i in supernodes[n]) / len(supernodes[n])) for n in names}
    slot = logit_slot(g, answer_id)
    answer = g.logit_labels[slot] if slot is not None else study.model.tokenizer.decode([answer_id])
    xy[f"logit {answer!r}"] = (g.n_pos - 1, g.n_layers + 0.5)
    rows = {int(r): k for k, r in enumerate(g.rows.tolist())}
    weights = {}
    for a in names:
        for b in names:
            if a != b:
                w = sum(float(g.edges[rows[j], i]) for j in supernodes[b] for i in supernodes[a] if j in rows)
                if w:
                    weights[(a, b)] = w
        if slot is not None:
            weights[(a, f"logit {answer!r}")] = sum(direct_to_logit(g, i, slot) for i in supernodes[a])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    wmax = max([abs(w) for w in weights.values()] + [1e-9])
    for (a, b), w in weights.items():
        (x0, y0), (x1, y1) = xy[a], xy[b]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
            arrowstyle="-|>", color="#2b6cb0" if w > 0 else "#c53030", lw=0.5 + 5 * abs(w) / wmax,
            alpha=0.35 + 0.6 * abs(w) / wmax, shrinkA=18, shrinkB=18))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{w:+.2f}", fontsize=7, color="#444")
    for n, (x, y) in xy.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="#fefcbf" if n.startswith("logit") else "#e2e8f0", ec="#4a5568"))
    ax.set_xticks(range(g.n_pos), [repr(t) for t in g.tokens], rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.8, g.n_pos - 0.2)
    ax.set_ylim(-1, g.n_layers + 1.5)
    ax.set_ylabel("layer (mean of the supernode's features)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = study.figures(name) / file
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def graph_summary(t: Traced) -> list[str]:
    g = t.graph
    logits = ", ".join(f"`{lab!r}` {float(p):.3f}" for lab, p in zip(g.logit_labels, g.logit_probs))
    return [f"- logit nodes (the model's top tokens): {logits}",
            f"- {g.n_features} feature nodes (the {g.n_features} most influential kept, "
            f"`max_feature_nodes`); {int(t.pruned.node_mask[:g.n_features].sum())} after pruning (0.8 / 0.98)",
            f"- replacement score {t.scores[0]:.3f}, completeness {t.scores[1]:.3f} "
            f"(pruned: {t.pruned_scores[0]:.3f} / {t.pruned_scores[1]:.3f}); traced in {t.seconds:.1f} s"]


def serve_line(study: Study, name: str) -> str:
    feats = f" --features {study.features_path}" if study.features_path else ""
    return (f"`cltrace serve runs/case-studies/{name}{feats}` and open `?graph={name}`: the pinned nodes and "
            "named supernodes are in its saved state (`" + name + ".view.json`).")


def write_page(study: Study, name: str, lines: list[str]) -> Path:
    study.docs.mkdir(parents=True, exist_ok=True)
    path = study.docs / f"{name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def save_json(study: Study, name: str, data: dict) -> Path:
    path = study.run_dir(name) / "results.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


# ---------------------------------------------------------------------- command line
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--transcoders", "-t", default="runs/demo/clt")
    p.add_argument("--features", default="runs/demo/features.db",
                   help="feature database for labels and top contexts (skipped when the file is missing)")
    p.add_argument("--max-features", type=int, default=200)
    p.add_argument("--grid", type=int, default=100, help="addition: operands 0..N-1")
    p.add_argument("--threads", type=int, default=2)
    return p


def load_study(args) -> Study:
    torch.set_num_threads(args.threads)
    model = cltrace.load_model(args.model)
    tc = cltrace.load_transcoder(args.transcoders)
    db, fpath = None, ""
    if args.features and Path(args.features).is_file():
        db = cltrace.FeatureDB.open(args.features)
        db.check_fits(tc, model)
        fpath = args.features
    return Study(model, tc, db, max_features=args.max_features, grid=args.grid, transcoders=args.transcoders,
                 features_path=fpath)


def header(study: Study, title: str, seconds: float) -> list[str]:
    db = (f"feature database `{study.features_path}`" if study.db is not None else
          "no feature database (labels are the tokens each feature's decoder promotes)")
    return [f"# {title}", "",
            f"Model `{study.model.name}`, transcoders `{study.transcoders}` ({study.tc.cfg.kind.upper()}, "
            f"{study.tc.n_features} features per layer), {db}. Generated by the script named below in "
            f"{seconds:.0f} s on the 2-core CPU (torch 2 threads, run under `nice -n 19` beside other jobs); "
            "every number on this page is printed by that run.", ""]


def supernodes_by_position(t: Traced, groups: dict[str, set[int]], answer_id: int, say: str, n_top: int = 40,
                           cap: int = 8) -> dict[str, list[int]]:
    """The rule every page uses to form supernodes from the n_top most influential pruned features:
    a feature joins the group whose token positions hold it; at the last position, a feature in the upper half
    of the layers whose direct edge into the answer's logit is positive joins `say`. Each group keeps its `cap`
    most influential features. (The paper groups by hand after reading the features; the pages list each member's
    label and contexts.)"""
    g = t.graph
    slot = logit_slot(g, answer_id)
    last = g.n_pos - 1
    out: dict[str, list[int]] = {name: [] for name in groups}
    out[say] = []
    for i in top_features(t, n_top):
        pos = int(g.features[i, 1])
        upper = int(g.features[i, 0]) >= g.n_layers // 2
        if pos == last and upper and slot is not None and direct_to_logit(g, i, slot) > 0:
            out[say].append(i)
            continue
        for name, positions in groups.items():
            if pos in positions:
                out[name].append(i)
                break
    return {k: v[:cap] for k, v in out.items()}


def token_positions(g: cltrace.Graph, words: list[str]) -> set[int]:
    """Positions of the tokens that overlap any of `words` in the prompt (by character span when the tokens
    spell the prompt; else tokens whose stripped text is one of the words)."""
    text = "".join(g.tokens[1:])
    if text != g.prompt:
        return {p for p, tok in enumerate(g.tokens) if p > 0 and tok.strip() in words}
    starts, k = [0], 0
    for tok in g.tokens[1:]:
        k += len(tok)
        starts.append(k)  # token p (p >= 1) spans [starts[p-1], starts[p])
    out = set()
    for w in words:
        i = g.prompt.find(w)
        while i >= 0:
            out |= {p for p in range(1, g.n_pos) if starts[p - 1] < i + len(w) and starts[p] > i}
            i = g.prompt.find(w, i + 1)
    return out


@dataclass
class Analysis:
    """One traced prompt with its supernodes, their members' descriptions, the steering results, and files."""

    traced: Traced
    answer_id: int
    answer: str
    supernodes: dict[str, list[int]]
    feature_rows: list[str]
    labels: dict[str, str]
    steering: dict[str, list[dict]]
    graph_file: Path


def analyse(study: Study, name: str, prompt: str, groups, say: str | None = None, cap: int = 8,
            factors: tuple[float, ...] = (-1.0,), traced: Traced | None = None) -> Analysis:
    """Trace `prompt`, form supernodes (`groups(graph)` -> {name: positions}; see supernodes_by_position),
    describe their members, scale each supernode by each factor in both modes, save the labeled subgraph and
    draw the graph and the supernode diagram into docs/case-studies/<name>/. `traced`: the prompt's graph when
    it was traced already."""
    t = traced or trace(study, prompt)
    g = t.graph
    answer_id, answer = int(g.logit_tokens[0]), g.logit_labels[0]
    sns = supernodes_by_position(t, groups(g), answer_id, say=say or f"say {answer.strip()}", cap=cap)
    rows, labels = feature_table(study, g, sns, final_scale(study, prompt), t.influence)
    steering = {sn: [steer_supernode(study, g, idx, f, answer_id, {k: v for k, v in sns.items() if k != sn and v})
                     for f in factors] for sn, idx in sns.items() if idx}
    path = save_subgraph(study, name, g, sns, labels, extra_pins=[g.logit_index(0)])
    draw_graph(study, name, t, f"{prompt!r} (pruned 0.8/0.98)")
    draw_supernodes(study, name, g, sns, answer_id, f"supernodes of {prompt!r}")
    return Analysis(t, answer_id, answer, sns, rows, labels, steering, path)


SUPERNODE_RULE = ("Rule: among the 40 most influential features that pruning keeps, a feature joins the supernode of "
                  "the token positions it sits at (groups below); at the last token, features in the upper half of "
                  "the layers whose direct edge into the top token's logit is positive form *say …*; each supernode "
                  "keeps its 8 most influential (6 on the addition page). (The paper groups by hand after reading "
                  "the features; here the rule is fixed and each member's evidence is listed, so the reader can "
                  "judge the names.)")
STEERING_HOW = ("Each supernode scaled by −1 at its own positions, as in the paper (`cltrace.intervene`, "
                "`op=\"scale\"`). "
                "*graph direct*: Σ edge / activation × Δactivation into the answer's logit node; *graph total*: "
                "the same along every path of the graph, features responding linearly; *constrained*: measured in "
                "the local replacement model (attention and norms frozen, errors held, features re-encoded with "
                "their nonlinearity); *free*: measured in the real model. Logit values are Δ(logit − mean logit) "
                "of the answer; the last column is each other supernode's summed activation after / before "
                "(constrained).")


def analysis_sections(study: Study, name: str, an: Analysis) -> list[str]:
    """The graph, supernode and intervention sections every page shares."""
    return ["## The graph", "", *graph_summary(an.traced), "", f"![pruned graph]({name}/graph.png)", "",
            "## Supernodes", "", SUPERNODE_RULE, "", *an.feature_rows, "",
            f"![supernodes]({name}/supernodes.png)", "",
            "Arrows: the summed direct graph edges between supernodes and into the answer's logit (logit − mean "
            "logit units at the clean activations).", "",
            "## Interventions", "", STEERING_HOW, "", *steering_table(an.steering, an.answer.strip()), "",
            *reading(an.steering)]


def reading(steering: dict) -> list[str]:
    """Plain statements computed from the table: does each inhibition move the answer as the graph says?"""
    out = ["What the numbers say:", ""]
    for name, rs in steering.items():
        r = next((x for x in rs if x["factor"] == -1.0), rs[-1])
        c, f, pred = r["constrained"]["measured"], r["free"]["measured"], r["graph_total"]
        if pred is None or c is None:
            continue
        if abs(pred) < 1e-6:
            out.append(f"- *{name}*: the graph predicts no change; constrained {c:+.3f}, free {f:+.3f}.")
            continue
        agree = "agrees in sign with" if (c < 0) == (pred < 0) else "has the opposite sign to"
        free = "the same sign" if (f < 0) == (pred < 0) else "the opposite sign"
        out.append(f"- *{name}*: constrained {c:+.3f} {agree} the graph's total prediction {pred:+.3f} "
                   f"(measured / predicted {c / pred:.2f}); in the real model {f:+.3f}, {free}.")
    return out
