"""Case study: acronyms ("The National Digital Analytics Group (N" -> "DAG" in the paper).

What the model predicts for the paper's prompt and a few other acronyms, and the graph of how it reaches its
top token: supernodes at each word of the name, inhibited in both modes next to the graph's predictions.

    nice -n 19 .venv/bin/python examples/case_studies/acronym.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "acronym"
PROMPT = "The National Digital Analytics Group (N"
CANDIDATES = [
    PROMPT,
    "The National Digital Analytics Group (ND",
    "The Central Intelligence Agency (C",
    "The National Aeronautics and Space Administration (N",
    "The World Health Organization (W",
]
WORDS = ["National", "Digital", "Analytics", "Group"]
CORRECT = "DAG"


def run(study: common.Study, prompt: str = PROMPT, candidates: list[str] = CANDIDATES,
        words: list[str] = WORDS) -> dict:
    t0 = time.perf_counter()
    preds = common.predictions(study, candidates)

    def groups(g) -> dict[str, set[int]]:
        out = {w: common.token_positions(g, [w]) for w in words}
        out["'(' and the last letter"] = set(range(max((p for s in out.values() for p in s), default=0) + 1,
                                                   g.n_pos))
        return out

    an = common.analyse(study, NAME, prompt, groups)
    g = an.traced.graph
    pieces = [study.model.tokenizer.decode([i]) for i in
              study.model.tokenizer(CORRECT, add_special_tokens=False)["input_ids"]]
    correct_p = next((t["prob"] for t in preds[0]["top"] if t["token"] == pieces[0]), None)
    seconds = time.perf_counter() - t0
    result = {"predictions": preds, "scores": an.traced.scores, "pruned_scores": an.traced.pruned_scores,
              "steering": an.steering, "correct_pieces": pieces, "p_correct_first_piece": correct_p,
              "supernodes": {k: [common.node_key(g, i) for i in v] for k, v in an.supernodes.items()},
              "graph_file": str(an.graph_file), "seconds": seconds}
    common.save_json(study, NAME, result)
    top = preds[0]["top"][0]
    verdict = ("answers it" if top["token"] == pieces[0] else
               f"does not answer it: its top token is `{top['token']!r}` (p = {top['prob']:.3f})")
    lines = common.header(study, "Acronyms: \"The National Digital Analytics Group (N\"", seconds)
    lines += ["Script: `examples/case_studies/acronym.py` (all case studies: `make case-studies`).", "",
              "## What the model predicts", "", *common.prediction_table(preds), "",
              f"The paper's answer is `{CORRECT}` (this tokenizer writes it as {' + '.join(repr(p) for p in pieces)}). "
              f"On the paper's prompt the model {verdict}; the first piece of the right answer, "
              f"`{pieces[0]!r}`, has p = " + (f"{correct_p:.3f}" if correct_p is not None else "below the top 5")
              + ". The graph below therefore explains how the model reaches its own top token, which is what an "
              "attribution graph explains; it is not the paper's DAG circuit.", "",
              "Supernode groups: one per word of the name (its token positions), and *'(' and the last letter*; "
              "*say …* at the last token.", "",
              *common.analysis_sections(study, NAME, an), "",
              "## Open it in the viewer", "", common.serve_line(study, NAME)]
    common.write_page(study, NAME, lines)
    return result


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run(common.load_study(args))


if __name__ == "__main__":
    main()
