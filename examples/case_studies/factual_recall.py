"""Case study: multi-step factual recall ("Fact: Michael Jordan plays the sport of" -> " basketball").

The paper's story: features for the athlete (at the name's tokens) feed features that say the sport at the last
token. Here: the candidate prompts' predictions, the graph, supernodes by a stated rule, and the supernodes
inhibited (×−1) in the local replacement model and in the real model, next to the graph's predictions;
then a swap: the athlete's features replaced by another athlete's.

    nice -n 19 .venv/bin/python examples/case_studies/factual_recall.py
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

NAME = "factual-recall"
CANDIDATES = [
    "Fact: Michael Jordan plays the sport of",
    "Fact: Tiger Woods plays the sport of",
    "Fact: Wayne Gretzky played the sport of",
    "Fact: Serena Williams plays the sport of",
    "Fact: the capital of the state containing Dallas is",
    "Fact: Dallas is in the state of Texas. The capital of Texas is",
]
PROMPT = CANDIDATES[0]
ATHLETE = ["Michael", "Jordan"]
SWAP = ("Fact: Tiger Woods plays the sport of", ["Tiger", "Woods"], " golf")


def swap_athlete(study: common.Study, g, athlete: list[int], n: int = 8) -> dict:
    """Turn the athlete supernode off and write another athlete's most active features (at the same positions,
    from that prompt's clean pass) in their place; the answer's and the other sport's probabilities, both modes."""
    m, tc = study.model, study.tc
    other_prompt, other_words, other_answer = SWAP
    ids = m.tokenize(other_prompt)
    if ids.numel() != g.input_ids.numel():
        return {"skipped": f"{other_prompt!r} has another number of tokens"}
    with torch.no_grad():
        clean = clean_run(m, tc, ids)
    positions = sorted(p for p, t in enumerate(m.decode(ids)) if t.strip() in other_words)
    cands = [(float(clean.acts[la][p, f]), la, p, f) for la in range(tc.n_layers) for p in positions
             for f in clean.acts[la][p].nonzero().flatten().tolist()]
    cands.sort(reverse=True)
    ivs = [Intervention(layer=la, pos=p, feature=f, value=v) for v, la, p, f in cands[:n]]
    ivs += [Intervention(layer=la, pos=p, feature=f, value=0.0, op="scale")
            for la, p, f in (common.node_key(g, i) for i in athlete)]
    target = m.tokenizer(other_answer, add_special_tokens=False)["input_ids"][0]
    own = int(g.logit_tokens[0])
    out = {"prompt": other_prompt, "n_written": len(ivs) - len(athlete), "n_removed": len(athlete),
           "answer": other_answer}
    for mode in ("constrained", "free"):
        res = cltrace.intervene(m, tc, None, ivs, mode=mode, graph=g, top=5)
        probs = {t["id"]: (t["prob_before"], t["prob_after"]) for t in res.token_changes}
        out[mode] = {"own": probs.get(own), "other": probs.get(target),
                     "top_after": [(t["token"], t["prob"]) for t in res.logits_after[:3]]}
    return out


def run(study: common.Study, prompt: str = PROMPT, candidates: list[str] = CANDIDATES,
        athlete: list[str] = ATHLETE) -> dict:
    t0 = time.perf_counter()
    preds = common.predictions(study, candidates)

    def groups(g) -> dict[str, set[int]]:
        names = common.token_positions(g, athlete)
        last = g.n_pos - 1
        return {"athlete": names, "plays / sport": set(range(max(names, default=0) + 1, last)), "'of' (other)": {last}}

    an = common.analyse(study, NAME, prompt, groups)
    g = an.traced.graph
    athlete_nodes = an.supernodes["athlete"]
    swap = swap_athlete(study, g, athlete_nodes) if athlete_nodes else {"skipped": "no athlete features"}
    seconds = time.perf_counter() - t0
    result = {"predictions": preds, "scores": an.traced.scores, "pruned_scores": an.traced.pruned_scores,
              "steering": an.steering, "swap": swap,
              "supernodes": {k: [common.node_key(g, i) for i in v] for k, v in an.supernodes.items()},
              "graph_file": str(an.graph_file), "seconds": seconds}
    common.save_json(study, NAME, result)
    write(study, prompt, an, preds, swap, seconds)
    return result


def write(study, prompt, an, preds, swap, seconds) -> None:
    g = an.traced.graph
    lines = common.header(study, "Multi-step factual recall: which sport an athlete plays", seconds)
    lines += ["Script: `examples/case_studies/factual_recall.py` (all case studies: `make case-studies`).", "",
              "## What the model predicts", "", *common.prediction_table(preds), "",
              f"The study traces `{prompt!r}`: the model's top token is `{an.answer!r}` (p = "
              f"{float(g.logit_probs[0]):.3f}). The two-hop prompts about Dallas are the paper's other example: the "
              "table shows whether this model names Austin there (a top token that is not the capital means it "
              "cannot), which is why the athlete prompt is the one traced.", "",
              "Supernode groups: *athlete* (the name's tokens), *plays / sport* (between the name and the last "
              "token), *'of' (other)* (the last token, not *say*).", "",
              *common.analysis_sections(study, NAME, an), "",
              *swap_lines(swap, an.answer), "",
              "## Open it in the viewer", "", common.serve_line(study, NAME)]
    common.write_page(study, NAME, lines)


def swap_lines(swap: dict, answer: str) -> list[str]:
    if "skipped" in swap:
        return [f"Swap not run: {swap['skipped']}."]
    out = ["### Swapping the athlete", "",
           f"The athlete supernode turned off and the {swap['n_written']} most active features at the other "
           f"athlete's name tokens in `{swap['prompt']!r}` written in at their clean values:", "",
           f"| mode | p({answer!r}) before → after | p({swap['answer']!r}) before → after | top after |",
           "|---|---|---|---|"]
    for mode in ("constrained", "free"):
        r = swap[mode]
        own = f"{r['own'][0]:.3f} → {r['own'][1]:.3f}" if r["own"] else "—"
        oth = f"{r['other'][0]:.3f} → {r['other'][1]:.3f}" if r["other"] else "not in either top 5"
        top = ", ".join(f"`{t!r}` {p:.2f}" for t, p in r["top_after"])
        out.append(f"| {mode} | {own} | {oth} | {top} |")
    return out


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run(common.load_study(args))


if __name__ == "__main__":
    main()
