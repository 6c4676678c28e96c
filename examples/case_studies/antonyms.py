"""Case study: multilingual antonyms ("The opposite of "small" is "" in English, French and Spanish).

The paper finds language-independent features for the concept and the operation, with language-specific
features at the input and output. Here: the predictions in three languages, the English graph with
supernodes (the adjective, "opposite", say-the-answer), which of their features are active in the French and
Spanish prompts too, and the English supernodes inhibited in the other languages' prompts.

    nice -n 19 .venv/bin/python examples/case_studies/antonyms.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import cltrace  # noqa: E402
from cltrace.interventions import Intervention, clean_run  # noqa: E402

NAME = "antonyms"
PROMPTS = {  # language -> (prompt, the adjective's words, the operation's words)
    "English": ('The opposite of "small" is "', ["small"], ["opposite"]),
    "French": ('Le contraire de "petit" est "', ["petit"], ["contraire"]),
    "Spanish": ('El contrario de "pequeño" es "', ["pequeño", "pequ", "eño", "ño"], ["contrario"]),
}


def other_language(study: common.Study, prompt: str, keys: list[tuple[int, int]]) -> dict:
    """Where the English supernode's (layer, feature)s are active in another language's prompt (clean pass),
    and what scaling them by −1 there (at those positions) does to that prompt's top token, in both modes."""
    m, tc = study.model, study.tc
    ids = m.tokenize(prompt)
    with torch.no_grad():
        clean = clean_run(m, tc, ids)
    active = [(la, p, f) for la, f in keys for p in range(1, ids.numel()) if clean.acts[la][p, f] > 0]
    out = {"active": len({(la, f) for la, _, f in active}), "of": len(keys), "positions": len(active)}
    if not active:
        return out
    ivs = [Intervention(layer=la, pos=p, feature=f, value=-1.0, op="scale") for la, p, f in active]
    for mode in ("constrained", "free"):
        res = cltrace.intervene(m, tc, prompt, ivs, mode=mode, top=5)
        out[mode] = {"token": res.top_token["token"], "p_before": res.top_token["prob_before"],
                     "p_after": res.top_token["prob_after"],
                     "top_after": [(t["token"], t["prob"]) for t in res.logits_after[:3]]}
    return out


def run(study: common.Study, prompts: dict = PROMPTS) -> dict:
    t0 = time.perf_counter()
    preds = common.predictions(study, [p for p, _, _ in prompts.values()])
    (lang, (prompt, adjective, operation)), *others = prompts.items()

    def groups(g) -> dict[str, set[int]]:
        adj = common.token_positions(g, adjective)
        op = common.token_positions(g, operation)
        rest = set(range(1, g.n_pos)) - adj - op
        return {f"'{adjective[0]}'": adj, f"'{operation[0]}'": op, "other tokens": rest}

    an = common.analyse(study, NAME, prompt, groups)
    g = an.traced.graph
    cross = {}
    for sn, idx in an.supernodes.items():
        keys = [(common.node_key(g, i)[0], common.node_key(g, i)[2]) for i in idx]
        cross[sn] = {olang: other_language(study, op_prompt, keys) for olang, (op_prompt, _, _) in others} if keys \
            else {}
    seconds = time.perf_counter() - t0
    result = {"predictions": preds, "scores": an.traced.scores, "pruned_scores": an.traced.pruned_scores,
              "steering": an.steering, "cross_language": cross,
              "supernodes": {k: [common.node_key(g, i) for i in v] for k, v in an.supernodes.items()},
              "graph_file": str(an.graph_file), "seconds": seconds}
    common.save_json(study, NAME, result)
    lines = common.header(study, "Multilingual antonyms: \"the opposite of small\"", seconds)
    lines += ["Script: `examples/case_studies/antonyms.py` (all case studies: `make case-studies`).", "",
              "## What the model predicts", "", *common.prediction_table(preds), "",
              f"The study traces the {lang} prompt `{prompt!r}` (top token `{an.answer!r}`, p = "
              f"{float(g.logit_probs[0]):.3f}). Supernode groups: the adjective's tokens, the operation word's "
              "tokens, other tokens, and *say …* at the last token.", "",
              *common.analysis_sections(study, NAME, an), "",
              "## Across languages", "",
              "For each English supernode: how many of its features are active anywhere in the other language's "
              "prompt (clean pass), and what scaling them by −1 at those positions does to that prompt's top token "
              "(p before → after; constrained = that prompt's local replacement model, free = the real model). "
              "Shared features that move the other language's answer are what the paper calls multilingual; "
              "features that are absent there are language-specific (or specific to this prompt).", "",
              "| supernode | language | active there | constrained: top token p before → after | free: p before → "
              "after | free top after |", "|---|---|---:|---|---|---|"]
    for sn, per in cross.items():
        for olang, r in per.items():
            if "constrained" not in r:
                lines.append(f"| {sn} | {olang} | {r['active']} of {r['of']} | — | — | — |")
                continue
            c, f = r["constrained"], r["free"]
            top = ", ".join(f"`{t!r}` {p:.2f}" for t, p in f["top_after"])
            lines.append(f"| {sn} | {olang} | {r['active']} of {r['of']} | `{c['token']!r}` {c['p_before']:.3f} → "
                         f"{c['p_after']:.3f} | {f['p_before']:.3f} → {f['p_after']:.3f} | {top} |")
    lines += ["", "## Open it in the viewer", "", common.serve_line(study, NAME)]
    common.write_page(study, NAME, lines)
    return result


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run(common.load_study(args))


if __name__ == "__main__":
    main()
