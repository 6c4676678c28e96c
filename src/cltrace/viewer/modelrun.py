"""What the viewer asks of the model: trace a new graph, steer features of a graph's prompt.

The model and transcoders are loaded on first use (in the job thread, see jobs.py) and kept. Steering calls
`cltrace.intervene` (next-token change, with the graph's direct prediction beside the measured change) and
`cltrace.intervene_generate` (continuations without and with the change, same seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cltrace.attribution import attribute, prune, scores
from cltrace.attribution.graph import Graph
from cltrace.errors import CltraceError
from cltrace.interventions import Intervention, intervene, intervene_generate
from cltrace.models.registry import load_model
from cltrace.transcoders.io import check_fits, load_transcoder
from cltrace.viewer.jobs import Progress


@dataclass
class ModelHost:
    """The model and transcoders the server runs; None when `cltrace serve` was not given them."""

    model_spec: str | None
    transcoders: str | None
    device: str = "cpu"
    _model = None
    _tc = None

    @property
    def available(self) -> bool:
        return bool(self.model_spec and self.transcoders)

    def get(self, progress: Progress):
        if not self.available:
            raise CltraceError("this server has no model: start it with `cltrace serve DIR --model M "
                               "--transcoders T` to trace and steer")
        if self._model is None:
            progress(f"loading {self.model_spec}", None)
            model = load_model(self.model_spec, device=self.device)
            progress("loading the transcoders", None)
            tc = load_transcoder(self.transcoders, device=self.device)
            check_fits(tc, model)
            self._model, self._tc = model, tc
        return self._model, self._tc

    def transcoder_if_loaded(self):
        return self._tc


def trace_graph(host: ModelHost, prompt: str, *, max_features: int | None, node_threshold: float,
                edge_threshold: float, labels_for=None, progress: Progress) -> Graph:
    """Attribute `prompt` and fill the meta the viewer and `cltrace trace` write (thresholds, scores)."""
    model, tc = host.get(progress)
    t0 = time.perf_counter()
    progress("tokenizing and running the model", 0.05)
    graph = attribute(model, tc, prompt, max_feature_nodes=max_features,
                      log=lambda msg: progress(msg, 0.8))
    progress("pruning and scoring", 0.85)
    pr = prune(graph, node_threshold, edge_threshold)
    rep_u, comp_u = scores(graph)
    rep_p, comp_p = scores(graph, pr)
    graph.meta.update(node_threshold=node_threshold, edge_threshold=edge_threshold, vocab_size=model.vocab_size,
                      scores={"replacement": rep_u, "completeness": comp_u, "replacement_pruned": rep_p,
                              "completeness_pruned": comp_p}, traced_in_viewer_s=time.perf_counter() - t0)
    if labels_for is not None:
        graph.meta["feature_labels"] = labels_for(graph.features[:, [0, 2]].tolist())
    return graph


def steer(host: ModelHost, graph: Graph, ivs: list[Intervention], *, mode: str, n_tokens: int,
          progress: Progress, top: int = 10) -> dict:
    """Before/after next tokens, the graph's direct prediction beside the measured change, continuations."""
    model, tc = host.get(progress)
    if graph.meta.get("model") and graph.meta["model"] != model.name:
        raise CltraceError(f"the graph was traced on {graph.meta['model']!r}, this server runs {model.name!r}")
    progress("running the intervention", 0.2)
    res = intervene(model, tc, graph.prompt, ivs, mode=mode, graph=graph, top=top)
    out = {"mode": mode, "before": res.logits_before, "after": res.logits_after, "top_token": res.top_token,
           "graph": res.graph, "interventions": [iv.to_dict() for iv in ivs], "generation": None}
    if n_tokens > 0:
        progress(f"generating {n_tokens} tokens, without and with the change", 0.5)
        gen = intervene_generate(model, tc, graph.prompt, ivs, n_tokens=n_tokens, mode=mode)
        decode = model.tokenizer.decode
        out["generation"] = {"original": [decode([t]) for t in gen.original_ids],
                             "steered": [decode([t]) for t in gen.steered_ids]}
    return out
