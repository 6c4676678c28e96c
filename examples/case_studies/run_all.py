"""Run every case study with one load of the model, its transcoders and the feature database; what
`make case-studies` calls. Each study is also a script of its own (same options).

    nice -n 19 .venv/bin/python examples/case_studies/run_all.py [--only addition acronym] [--grid 100]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import acronym  # noqa: E402
import addition  # noqa: E402
import antonyms  # noqa: E402
import common  # noqa: E402
import factual_recall  # noqa: E402

STUDIES = {"factual-recall": factual_recall, "addition": addition, "acronym": acronym, "antonyms": antonyms}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=list(STUDIES), help="run these studies only")
    args = p.parse_args()
    t0 = time.perf_counter()
    study = common.load_study(args)
    print(f"loaded {args.model} and {args.transcoders} in {time.perf_counter() - t0:.1f} s", flush=True)
    for name in args.only or STUDIES:
        t = time.perf_counter()
        STUDIES[name].run(study)
        print(f"{name}: docs/case-studies/{name}.md written in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"all case studies: {time.perf_counter() - t0:.1f} s wall", flush=True)


if __name__ == "__main__":
    main()
