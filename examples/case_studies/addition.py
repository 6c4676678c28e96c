"""Case study: addition ("a+b=" over a grid of operands), the paper's operand plots.

One batched forward pass per chunk of prompts "a+b=" (a, b in 0..N−1; Gemma writes each digit as its own
token) gives the model's first answer token and every CLT feature's activation at "=". A few prompts the model
answers are traced; their most influential features at "=" get a heat map of activation over (a, b), an
output-weight plot (their decoder's effect on the digit tokens' logits) and a type by a stated rule. Then the
"=" features are inhibited and the answer's change compared with the graph's prediction.

    nice -n 19 .venv/bin/python examples/case_studies/addition.py [--grid 100]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from cltrace.features.db import transcoder_fingerprint  # noqa: E402
from cltrace.features.effects import decoder_write, frozen_final_norm  # noqa: E402

NAME = "addition"
N_TRACED = 2
N_FEATURES = 6

# The rule: a partition of the grid explains a heat map by its R² (1 − within-group / total variance of the
# activation). Keys, what type each supports, and how many groups each has at N = 100.
PARTITIONS = {
    "a mod 10": ("add-function (operand)", lambda a, b: a % 10),
    "b mod 10": ("add-function (operand)", lambda a, b: b % 10),
    "a // 10": ("add-function (operand)", lambda a, b: a // 10),
    "b // 10": ("add-function (operand)", lambda a, b: b // 10),
    "a": ("add-function (operand)", lambda a, b: a),
    "b": ("add-function (operand)", lambda a, b: b),
    "(a+b) mod 10": ("sum", lambda a, b: (a + b) % 10),
    "(a+b) // 10": ("sum", lambda a, b: (a + b) // 10),
    "a+b": ("sum", lambda a, b: a + b),
    "(a mod 10, b mod 10)": ("lookup table", lambda a, b: (a % 10) * 10 + b % 10),
}
MIN_R2 = 0.5  # below: unclassified
NEAR = 0.9  # keys within this fraction of the best R² count as explaining it; the one with fewest groups wins
MIN_ACTIVE = 0.005  # active on fewer prompts of the grid: "rare"
MIN_SPREAD = 0.1  # std / mean of the activation below this: "near-constant" (on everywhere, hardly varying)


def r2_by_partition(H: np.ndarray) -> dict[str, tuple[float, int]]:
    """H [N, N] activation over (a, b) -> {key: (R² of the group means, number of groups)}."""
    n = H.shape[0]
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    y = H.ravel().astype(np.float64)
    total = ((y - y.mean()) ** 2).sum()
    out = {}
    for key, (_, fn) in PARTITIONS.items():
        g = fn(a, b).ravel()
        _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
        means = np.bincount(inv, weights=y) / counts
        within = ((y - means[inv]) ** 2).sum()
        out[key] = (1.0 - within / total if total > 0 else 0.0, len(counts))
    return out


def classify(H: np.ndarray) -> dict:
    """The feature's type by the rule: the partition with the fewest groups among those whose R² is at least
    NEAR × the best R² (the simplest explanation), when the best R² is at least MIN_R2."""
    active = float((H > 0).mean())
    r2 = r2_by_partition(H) if active > 0 else {}
    if active < MIN_ACTIVE:
        return {"type": "rare on the grid", "key": None, "r2": r2, "active": active}
    if H.std() < MIN_SPREAD * H.mean():
        return {"type": "near-constant on the grid", "key": None, "r2": r2, "active": active}
    best = max(v for v, _ in r2.values())
    if best < MIN_R2:
        return {"type": "unclassified", "key": None, "r2": r2, "active": active}
    near = [(n, -v, k) for k, (v, n) in r2.items() if v >= NEAR * best]
    _, _, key = min(near)
    return {"type": PARTITIONS[key][0], "key": key, "r2": r2, "active": active}


def digit_ids(model) -> list[int]:
    ids = [model.tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise SystemExit("this tokenizer does not write each digit as one token; the addition study needs that")
    return [i[0] for i in ids]


def sweep(study: common.Study) -> dict:
    """`grid_pass`, kept in runs/case-studies/addition/sweep-N.pt for the same model and transcoders (the pass is
    the slow part: a rerun, e.g. after the feature database appears, reuses it)."""
    key = {"model": study.model.name, "transcoders": transcoder_fingerprint(study.tc), "grid": study.grid}
    path = study.run_dir(NAME) / f"sweep-{study.grid}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == json.dumps(key):
            return saved
    out = grid_pass(study)
    torch.save({**out, "key": json.dumps(key)}, path)
    return out


@torch.no_grad()
def grid_pass(study: common.Study) -> dict:
    """Every prompt "a+b=" of the grid: the top next token, p(the answer's first digit), the final norm's scale
    and every feature's activation at "=". Prompts of equal length are batched (no padding)."""
    m, tc = study.model, study.tc
    n = study.grid
    first = digit_ids(m)
    by_len: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for a in range(n):
        for b in range(n):
            ids = m.tokenize(f"{a}+{b}=")
            by_len.setdefault(ids.numel(), []).append((a, b, ids))
    acts = torch.zeros(n, n, tc.n_layers, tc.n_features, dtype=torch.float16)
    top = torch.zeros(n, n, dtype=torch.long)
    p_right = torch.zeros(n, n)
    scales, n_tokens = [], 0
    t0 = time.perf_counter()
    for items in by_len.values():
        for k in range(0, len(items), study.batch):
            chunk = items[k : k + study.batch]
            ids = torch.stack([c[2] for c in chunk]).to(m.device)  # [B, T]
            tr = m.forward(ids, compute_logits=False)
            logits = m.unembed(tr.final_normed[:, -1:])[:, 0].float()  # [B, V]
            probs = torch.softmax(logits, -1)
            scales.append(tr.frozen.scales["final"][:, -1].flatten().float())
            ai = torch.tensor([c[0] for c in chunk])
            bi = torch.tensor([c[1] for c in chunk])
            right = torch.tensor([first[int(str(a + b)[0])] for a, b, _ in chunk])
            top[ai, bi] = logits.argmax(-1).cpu()
            p_right[ai, bi] = probs.gather(1, right[:, None].to(probs.device))[:, 0].cpu()
            for layer in range(tc.n_layers):
                x = tc.select_input(tr.resid_mid[layer][:, -1], tr.mlp_in[layer][:, -1])
                acts[ai, bi, layer] = tc.encode(x, layer).to(torch.float16).cpu()
            n_tokens += ids.numel()
    seconds = time.perf_counter() - t0
    right_first = torch.tensor([[first[int(str(a + b)[0])] for b in range(n)] for a in range(n)])
    return {"acts": acts, "top": top, "p_right": p_right, "correct": top == right_first,
            "final_scale": float(torch.cat(scales).mean()), "seconds": seconds, "tokens": n_tokens}


@torch.no_grad()
def greedy_accuracy(study: common.Study, pairs: list[tuple[int, int]]) -> float:
    """Fraction of pairs whose greedy continuation starts with every digit of a+b (full answers, not only the
    first token): up to 3 greedy steps, batched by prompt length."""
    m = study.model
    by_len: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for a, b in pairs:
        ids = m.tokenize(f"{a}+{b}=")
        by_len.setdefault(ids.numel(), []).append((a, b, ids))
    right = 0
    for items in by_len.values():
        ids = torch.stack([c[2] for c in items]).to(m.device)
        for _ in range(3):
            nxt = m.logits(ids)[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
        for (a, b, p), row in zip(items, ids):
            text = m.tokenizer.decode(row[p.numel():].tolist())
            right += text.startswith(str(a + b)) and not text[len(str(a + b)):][:1].isdigit()
    return right / max(1, len(pairs))


def output_weights(study: common.Study, layer: int, feature: int, scale: float, digits: list[int]) -> np.ndarray:
    """The feature's last decoder write carried to the digit tokens' logits through the final norm frozen at the
    grid's mean scale (the paper's output-weight plot, over the tokens an answer starts with)."""
    m = study.model
    w = decoder_write(study.tc, layer)[feature : feature + 1].to(m.device)
    with torch.no_grad():
        h = frozen_final_norm(m, w, scale)  # [1, D]
        eff = h @ m.W_U[digits].float().T  # [1, 10]
    return eff[0].cpu().numpy()


def choose_prompts(study: common.Study, grid: dict, k: int) -> list[tuple[int, int]]:
    """k prompts the model answers (first digit right) with two-digit operands when the grid has them, most
    confident first, distinct answer digits so the graphs differ; prompts it gets wrong only when too few are
    right (the page says so)."""
    n = study.grid
    two = [(a, b) for a in range(n) for b in range(n) if n < 20 or (a >= 10 and b >= 10)]
    cands = sorted(two, key=lambda ab: (not bool(grid["correct"][ab]), -float(grid["p_right"][ab])))
    out, seen = [], set()
    for a, b in cands:
        if str(a + b)[0] not in seen:
            out.append((a, b))
            seen.add(str(a + b)[0])
        if len(out) == k:
            break
    return out


def plot_feature(study: common.Study, H: np.ndarray, eff: np.ndarray, cls: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.4, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax.imshow(H, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xlabel("b")
    ax.set_ylabel("a")
    ax.set_title(f"activation at '=' over a+b=\n{cls['type']}" + (f" ({cls['key']}, R² {cls['r2'][cls['key']][0]:.2f})"
                                                                    if cls["key"] else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    bx.bar(range(10), eff, color=["#2b6cb0" if v > 0 else "#c53030" for v in eff])
    bx.set_xticks(range(10), [str(d) for d in range(10)])
    bx.set_xlabel("next token")
    bx.set_title("output weights: decoder → digit logits", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def plot_accuracy(study: common.Study, grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.4, 3.6))
    ax.imshow(grid["correct"].numpy(), origin="lower", cmap="Greys", aspect="auto")
    ax.set_title("first answer token right (black)", fontsize=9)
    im = bx.imshow(grid["p_right"].numpy(), origin="lower", cmap="magma", aspect="auto", vmin=0, vmax=1)
    bx.set_title("p(the answer's first digit)", fontsize=9)
    for x in (ax, bx):
        x.set_xlabel("b")
        x.set_ylabel("a")
    fig.colorbar(im, ax=bx, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def run(study: common.Study) -> dict:
    t0 = time.perf_counter()
    m = study.model
    digits = digit_ids(m)
    grid = sweep(study)
    n = study.grid
    acc_first = float(grid["correct"].float().mean())
    rng = np.random.default_rng(0)
    sample = [(int(a), int(b)) for a, b in rng.integers(0, n, size=(min(100, n * n), 2))]
    acc_full = greedy_accuracy(study, sample)
    chosen = choose_prompts(study, grid, N_TRACED)
    traced = {}
    for a, b in chosen:
        traced[(a, b)] = common.trace(study, f"{a}+{b}=")
    # the most influential features at "=" over the traced prompts, each once
    ranked = sorted(((float(t.influence[i]), common.node_key(t.graph, i)) for t in traced.values()
                     for i in common.top_features(t, 40, {t.graph.n_pos - 1})), reverse=True)
    feats, seen = [], set()
    for inf, (layer, _, f) in ranked:
        if (layer, f) not in seen:
            feats.append((layer, f, inf))
            seen.add((layer, f))
        if len(feats) == N_FEATURES:
            break
    figs = study.figures(NAME)
    plot_accuracy(study, grid, figs / "accuracy.png")
    classes = []
    for layer, f, inf in feats:
        H = grid["acts"][:, :, layer, f].float().numpy()
        cls = classify(H)
        eff = output_weights(study, layer, f, grid["final_scale"], digits)
        plot_feature(study, H, eff, cls, f"feature {layer}:{f}", figs / f"feature_{layer}_{f}.png")
        classes.append({"layer": layer, "feature": f, "influence": inf, **cls, "output": eff.tolist()})
    # the graph of the first traced prompt: supernodes at each operand and at "=", inhibited
    (a0, b0), t = next(iter(traced.items()))

    def groups(g) -> dict[str, set[int]]:
        plus, last = g.tokens.index("+"), g.n_pos - 1
        return {f"operand {a0}": set(range(1, plus)), f"operand {b0}": set(range(plus + 1, last)),
                "'=' (other)": {last}}

    an = common.analyse(study, NAME, t.graph.prompt, groups, cap=6, traced=t)
    shift = logit_shift(study, t, an.supernodes)
    seconds = time.perf_counter() - t0
    result = {"grid": n, "accuracy_first_token": acc_first, "accuracy_full_sample": acc_full,
              "sample_size": len(sample), "sweep_seconds": grid["seconds"], "sweep_tokens": grid["tokens"],
              "traced": {f"{a}+{b}=": {"scores": t.scores, "pruned_scores": t.pruned_scores,
                                       "right": bool(grid["correct"][a, b]), "p_right": float(grid["p_right"][a, b]),
                                       "top": t.graph.logit_labels[0]}
                         for (a, b), t in traced.items()},
              "features": classes, "steering": an.steering, "shift": shift, "graph_file": str(an.graph_file),
              "seconds": seconds}
    common.save_json(study, NAME, result)
    write(study, result, traced, an)
    return result


def logit_shift(study: common.Study, t: common.Traced, sns: dict[str, list[int]]) -> list[dict]:
    """The "say" supernode at "=" turned off: every graph logit's predicted (direct, total) and measured change."""
    g = t.graph
    say = next((v for k, v in sns.items() if k.startswith("say") and v), None)
    if not say:
        return []
    keys = [common.node_key(g, i) for i in say]
    changes = {k: -float(g.activations[i]) for k, i in zip(keys, say)}
    direct = common.direct_prediction(g, changes)
    total = common.total_prediction(g, changes)
    ivs = [common.Intervention(layer=la, pos=p, feature=f, value=0.0) for la, p, f in keys]
    rows = []
    res = {mode: common.cltrace.intervene(study.model, study.tc, None, ivs, mode=mode, graph=g, top=10)
           for mode in ("constrained", "free")}
    for j, (tok, lab) in enumerate(zip(g.logit_tokens.tolist(), g.logit_labels)):
        meas = {mode: next(x["measured"] for x in r.graph["logit_changes"] if x["id"] == tok)
                for mode, r in res.items()}
        rows.append({"token": lab, "direct": float(direct[g.n_features + j]), "total": float(total[g.n_features + j]),
                     **meas})
    rows.append({"top_after": {mode: [(x["token"], x["prob"]) for x in r.logits_after[:3]] for mode, r in res.items()}})
    return rows


def write(study: common.Study, r: dict, traced: dict, an: common.Analysis) -> None:
    n = r["grid"]
    lines = common.header(study, "Addition: operand plots on a grid of a+b=", r["seconds"])
    lines += ["Script: `examples/case_studies/addition.py` (all case studies: `make case-studies`).", "",
              "## Can the model add?", "",
              f"Prompts `a+b=` for a, b in 0..{n - 1} ({n * n:,} prompts; Gemma's tokenizer writes each digit as "
              f"one token, so `36+59=` is `<bos> 3 6 + 5 9 =`). One batched forward pass per chunk of equal-length "
              f"prompts: {r['sweep_tokens']:,} tokens in {r['sweep_seconds']:.0f} s.", "",
              f"- the first answer token is the answer's first digit (greedy): **{r['accuracy_first_token']:.1%}** "
              "of the grid", f"- the whole answer, greedy (a random sample of {r['sample_size']} prompts): "
              f"**{r['accuracy_full_sample']:.1%}**", "",
              f"![accuracy]({NAME}/accuracy.png)", "",
              ("So the model gets most of the grid wrong (the paper's model answers these prompts). "
               if r["accuracy_full_sample"] < 0.5 else "So the model answers most of the grid. ")
              + "The features below are read on the whole grid all the same (what they fire on does not need the "
              "answer to be right), and the graphs are traced on prompts whose first digit it gets right (most "
              "confident first; wrong ones only if too few are right):", ""]
    for p, v in r["traced"].items():
        right = "right" if v["right"] else "WRONG"
        lines.append(f"- `{p}` (top token `{v['top']!r}`, first digit {right}, p(right first digit) "
                     f"{v['p_right']:.3f}): replacement {v['scores'][0]:.3f}, completeness {v['scores'][1]:.3f} "
                     "(pruned "
                     f"{v['pruned_scores'][0]:.3f} / {v['pruned_scores'][1]:.3f})")
    lines += ["", "## The most influential features at '=' and their operand plots", "",
              f"The {N_FEATURES} most influential features at the '=' position over the traced graphs. Left: the "
              "feature's activation at '=' over the grid (a up, b across). Right: its output weights, its last "
              "decoder write carried through the final norm (frozen at the grid's mean scale) to the logits of the "
              "digit tokens.", "",
              "**Type, by rule.** For each partition of the grid below, R² = 1 − (variance within groups) / (total "
              "variance) of the feature's activation. The best R² must be at least "
              f"{MIN_R2} (else *unclassified*); among the partitions with R² ≥ {NEAR} × the best, the one with the "
              "fewest groups names the type: a partition by an operand (a, b, a mod 10, b mod 10, a // 10, b // 10) → "
              "*add-function (operand)*; by the sum (a+b, (a+b) mod 10, (a+b) // 10) → *sum*; by both operands' "
              "last digits (a mod 10, b mod 10) → *lookup table*. Active on fewer than "
              f"{MIN_ACTIVE:.1%} of the grid → *rare on the grid*; a standard deviation under {MIN_SPREAD} × the mean "
              "activation → *near-constant on the grid* (the R² then describe small wiggles).", "",
              "| feature | influence | active on | type | best partitions (R²) |", "|---|---:|---:|---|---|"]
    for c in r["features"]:
        best = sorted(c["r2"].items(), key=lambda kv: -kv[1][0])[:3]
        lines.append(f"| {c['layer']}:{c['feature']} | {c['influence']:.4f} | {c['active']:.1%} | **{c['type']}** | "
                     + ", ".join(f"{k} {v[0]:.2f}" for k, v in best) + " |")
    lines.append("")
    for c in r["features"]:
        lines += [f"![feature {c['layer']}:{c['feature']}]({NAME}/feature_{c['layer']}_{c['feature']}.png)", ""]
    g = an.traced.graph
    lines += [f"The graph below is `{g.prompt}`'s. Supernode groups: each operand's digit tokens, and '=' (the "
              "last token, not *say*).", "", *common.analysis_sections(study, NAME, an), ""]
    if r["shift"]:
        top_after = r["shift"][-1]["top_after"]
        lines += ["The *say* supernode turned off: every logit of the graph, the graph's predictions next to the "
                  "measured changes (Δ(logit − mean logit)):", "",
                  "| token | graph direct | graph total | constrained | free |", "|---|---:|---:|---:|---:|"]
        for row in r["shift"][:-1]:
            lines.append(f"| `{row['token']!r}` | {row['direct']:+.3f} | {row['total']:+.3f} | "
                         f"{row['constrained']:+.3f} | {row['free']:+.3f} |")
        lines += ["", "Top tokens after: constrained " + ", ".join(f"`{t!r}` {p:.2f}" for t, p in
                                                                   top_after["constrained"])
                  + "; free " + ", ".join(f"`{t!r}` {p:.2f}" for t, p in top_after["free"]) + ".", ""]
    lines += ["## Open it in the viewer", "", common.serve_line(study, NAME)]
    common.write_page(study, NAME, lines)


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run(common.load_study(args))


if __name__ == "__main__":
    main()
