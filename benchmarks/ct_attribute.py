"""Run with circuit-tracer's venv: attribute given token ids with a given transcoder folder, report time and memory.

/tmp/ct-venv/bin/python benchmarks/ct_attribute.py MODEL_DIR TC_DIR OUT_JSON --ids 2,1234,... [--max-feature-nodes N]
    [--batch-size 32] [--graph PATH]

The transformerlens backend with a lazily read decoder (circuit-tracer's fastest CPU setting, the one
bench_attribution.py compares with). Peak RSS is sampled during `attribute` only (model loading peaks higher).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, "/work/shared/reference/circuit-tracer")
from run_reference import RssSampler, load_replacement_model, mib  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("transcoders")
ap.add_argument("out")
ap.add_argument("--ids", required=True)
ap.add_argument("--max-feature-nodes", type=int, default=None)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--graph", default=None)
ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(args.threads)
from circuit_tracer import attribute  # noqa: E402

model, t_load = load_replacement_model(os.path.abspath(args.model), os.path.abspath(args.transcoders),
                                       "transformerlens", True, False)
tokens = torch.tensor([int(t) for t in args.ids.split(",")])
with RssSampler() as sampler:
    t0 = time.time()
    graph = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=args.batch_size,
                      max_feature_nodes=args.max_feature_nodes, verbose=False)
    seconds = time.time() - t0
size = None
if args.graph:
    graph.to_pt(args.graph)
    size = os.path.getsize(args.graph)
json.dump({"seconds": seconds, "peak_mib": mib(sampler.peak), "load_s": t_load, "graph_bytes": size,
           "n_active": int(graph.active_features.shape[0]), "n_selected": int(len(graph.selected_features)),
           "n_pos": int(graph.n_pos)}, open(args.out, "w"))
