"""`cltrace.validate`: how faithful and how complete are the attribution graphs of a transcoder set, over
many prompts, measured as the paper measures them (see cltrace.validation)."""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cltrace.errors import CltraceError
from cltrace.features.distributed import current_dist
from cltrace.models.adapter import ModelAdapter
from cltrace.models.registry import load_model
from cltrace.training.distributed import Dist
from cltrace.transcoders.io import check_fits, load_transcoder
from cltrace.transcoders.transcoder import Transcoder
from cltrace.validation.plots import plot_all
from cltrace.validation.prompt_run import Settings, measure_prompt
from cltrace.validation.prompts import Prompt, load_prompts
from cltrace.validation.report import render
from cltrace.validation.store import ResultStore, write_json
from cltrace.validation.summary import summarize

TranscoderLike = str | Path | Transcoder


def check_settings(s: Settings) -> None:
    """One-line errors for settings that cannot work (the library names the setting)."""
    if s.max_features is not None and s.max_features < 1:
        raise CltraceError(f"max_features must be at least 1 (or None for all), not {s.max_features}")
    if s.sources < 0 or s.targets < 1:
        raise CltraceError(f"sources must be ≥ 0 and targets ≥ 1, not {s.sources} and {s.targets}")
    for t in (s.node_threshold, s.edge_threshold, *s.node_thresholds):
        if not (isinstance(t, (int, float)) and 0 < t <= 1):
            raise CltraceError(f"thresholds must be in (0, 1], not {t}")
    if s.batch_size < 1:
        raise CltraceError(f"batch_size must be at least 1, not {s.batch_size}")


def fingerprint(tc: Transcoder) -> str:
    """Config and weight checksums: results of other weights are never mixed into a resumed run."""
    h = hashlib.sha1(json.dumps(tc.cfg.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in (tc.b_enc, tc.b_dec, tc.log_threshold):
            h.update(repr(float(p.double().sum())).encode())
        for s in range(tc.n_layers):  # layer by layer: the same for a lazy (on-disk) transcoder
            h.update(repr(float(tc.encoder(s).double().sum())).encode())
            h.update(repr(float(tc.decoder(s).double().sum())).encode())
    return h.hexdigest()[:16]


def _open(spec: TranscoderLike, model: ModelAdapter) -> tuple[Transcoder, str]:
    if isinstance(spec, Transcoder):
        tc, where = spec, f"{spec.cfg.kind} (in memory)"
    else:
        tc = load_transcoder(spec, device=model.device, dtype=model.dtype)
        where = str(spec)
    check_fits(tc, model)
    return tc.eval(), where


def _labels(specs: list[TranscoderLike]) -> list[str]:
    names = [Path(s).name if not isinstance(s, Transcoder) else s.cfg.kind for s in specs]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"{names[0]}-a", f"{names[1]}-b"]
    return names


def compact(result: dict) -> dict:
    """What the summary and plots need of a prompt's result, with number lists as float arrays (8 bytes a
    number instead of a Python float's ~32): the run holds one of these per prompt, and one graph."""
    out = {k: v for k, v in result.items() if k not in ("ids", "tokens", "perturbations")}
    out["perturbations"] = [
        {k: (array("d", (math.nan if x is None else x for x in v)) if isinstance(v, list) else
             {d: array("d", (math.nan if x is None else x for x in xs)) for d, xs in v.items()})
         for k, v in p.items() if k not in ("source", "targets", "activation")}
        for p in result.get("perturbations", [])]
    return out


def run_set(model: ModelAdapter, tc: Transcoder, prompts: list[Prompt], store: ResultStore | None,
            settings: Settings, label: str, progress: bool, stop_after: int | None = None,
            d: Dist | None = None) -> tuple[list[dict], int]:
    """Results of every prompt, in prompt order (stored ones read back, others computed and stored):
    (results, n computed); on ranks other than 0 ([], n computed by this rank).

    On many processes (d): rank 0 reads the stored results (only it has `store`), the missing prompts go
    round robin to the ranks, W at a time, and each round's results are gathered to rank 0, which stores
    them; every prompt's result is independent of where it ran (its sampling is seeded by the prompt).
    stop_after: compute at most this many prompts, then stop (how the tests interrupt a run).
    """
    d = d or Dist()
    stored = [store.load(p) for p in prompts] if d.is_main else []
    stored = [compact(r) if r is not None else None for r in stored]  # what the summary needs, kept small
    todo = d.broadcast_object([i for i, r in enumerate(stored) if r is None])  # rank 0's list
    todo = todo[:stop_after] if stop_after is not None else todo
    computed = 0
    bar = tqdm(total=len(todo), desc=f"validate {label}", unit="prompt", disable=not (progress and d.is_main),
               dynamic_ncols=True)
    for start in range(0, len(todo), d.world):
        mine = todo[start + d.rank] if start + d.rank < len(todo) else None
        res = measure_prompt(model, tc, prompts[mine], settings) if mine is not None else None
        computed += mine is not None
        for i, r in d.gather_objects_over_data((mine, res)):
            if d.is_main and i is not None:
                store.save(prompts[i], r)
                stored[i] = compact(r)
                bar.update(1)
        if d.is_main:
            done = [r["completeness_pruned"] for r in stored if r and r.get("completeness_pruned") is not None]
            bar.set_postfix(completeness=f"{sum(done) / max(1, len(done)):.3f}", refresh=False)
    bar.close()
    return [r for r in stored if r is not None], computed


def validate(model: ModelAdapter | str, transcoders: TranscoderLike, prompts: str | Path | list[str] | None = None, *,
             out: str | Path, compare: TranscoderLike | None = None, n: int | None = None, corpus: str | None = None,
             context_len: int = 16, settings: Settings | None = None, progress: bool = True,
             command: str | None = None, log: Callable[[str], None] | None = None,
             stop_after: int | None = None, dist: Dist | None = None) -> dict:
    """Validate the attribution graphs of `transcoders` (and of `compare`) on a prompt set; write `out`.

    prompts: a list of texts or a prompt file; else `n` held-out contexts of `corpus` (context_len tokens);
    else the built-in set (cltrace.validation.default_prompts). n: the first n prompts.
    out/<label>/prompts/*.json hold one result per prompt (a rerun computes only missing ones);
    out/validation.json the summaries, out/report.md the report, out/*.png the plots.
    stop_after: compute at most this many new prompts per set, then return without a summary (an interrupted
    run, for tests). Returns {"summaries", "computed" (new results per set), "out", "files", "complete"}.
    dist: a `training.distributed.Dist` (default: the initialised process group, else one process). Under
    torchrun every rank calls validate with the same arguments, the prompts are split over the ranks and rank
    0 writes everything (the same results and report as one process); other ranks return empty summaries.
    """
    d = dist if dist is not None else current_dist()
    settings = settings or Settings()
    check_settings(settings)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CltraceError(f"--out {out} is a file: give a folder")
    if isinstance(model, str):
        model = load_model(model)
    plist = load_prompts(model, prompts, n=n, corpus=corpus, context_len=context_len)
    specs = [transcoders] + ([compare] if compare is not None else [])
    labels = _labels(specs)
    summaries, computed, runs, where = {}, {}, {}, {}
    for label, spec in zip(labels, specs):
        tc, where[label] = _open(spec, model)  # one set in memory at a time
        identity = {"model": model.name, "transcoder": fingerprint(tc), "kind": tc.cfg.kind,
                    "settings": settings.to_dict()}
        store = ResultStore(out / label, identity) if d.is_main else None
        results, computed[label] = run_set(model, tc, plist, store, settings, label, progress, stop_after, d)
        del tc
        if not d.broadcast_object(len(results) == len(plist)):  # interrupted on purpose (stop_after)
            return {"summaries": {}, "computed": computed, "out": str(out), "files": [], "complete": False}
        if not d.is_main:
            continue
        summaries[label] = summarize(results)
        runs[label] = (summaries[label], results)
        if log:
            s = summaries[label]["scores"]
            log(f"{label}: {len(results)} prompts ({computed[label]} computed), completeness "
                f"{s['completeness']['mean']:.3f} ({s['completeness_pruned']['mean']:.3f} pruned), replacement "
                f"{s['replacement']['mean']:.3f}")
    if not d.is_main:
        return {"summaries": {}, "computed": computed, "out": str(out), "files": [], "complete": True}
    source = (f"{len(plist)} held-out contexts of {context_len} tokens from corpus {corpus}" if corpus else
              f"file {prompts}" if isinstance(prompts, (str, Path)) else
              "the built-in set" if prompts is None else "a list")
    info = {"model": model.name, "transcoders": where, "settings": settings.to_dict(), "prompts": source,
            "command": command}
    write_json(out / "validation.json", {"info": info, "summaries": summaries})
    files = plot_all(runs, out)
    (out / "report.md").write_text(render(summaries, info))
    return {"summaries": summaries, "computed": computed, "out": str(out), "complete": True,
            "files": [str(out / "validation.json"), str(out / "report.md")] + [str(f) for f in files]}
