"""`build_features`: one pass over a corpus -> the feature database, resumable.

    contexts (ContextStream, fixed order) --B at a time--> FeatureStats.add_batch   (one forward per batch)
        every `checkpoint_every` batches, and on Ctrl-C:   OUT.partial/state.safetensors (+ progress.json)
    end:  output and input effects (effects.py) -> save_database (temporary file, os.replace, labels kept)

Resuming (`resume=True`) loads OUT.partial/, restarts the corpus at the saved position and continues with the
same batches, so the database it ends with equals the one an uninterrupted build writes (up to the build
timestamp). Settings that change the result must match the interrupted build's; `n_tokens` may grow.
Ctrl-C stops after the batch in flight, saves, and says how to resume; a second Ctrl-C stops at once (the
last checkpoint remains).

Under torchrun (a process group initialised, `features.distributed`): batch b goes to rank b mod W, each rank
keeps the statistics of its share, and at every checkpoint and at the end they are merged into rank 0, which
alone writes OUT.partial/ and the database: the same file one process writes (see features.stats, `merge`).
A checkpoint holds the merged statistics, so a build resumes with any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from cltrace.data.tokens import ContextStream, Position, special_tokens
from cltrace.errors import CltraceError, SettingError
from cltrace.features.db import existing_labels, save_database, transcoder_fingerprint
from cltrace.features.distributed import current_dist, owns, reduce_stats
from cltrace.features.effects import Effects, input_effects, output_effects
from cltrace.features.stats import PRECISIONS, FeatureStats
from cltrace.transcoders.io import check_fits

STATE = "state.safetensors"
PROGRESS = "progress.json"


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an unfinished build of `out` keeps its checkpoint."""
    return Path(str(out) + ".partial")


def corpus_name(corpus) -> str:
    if isinstance(corpus, (list, tuple)):
        digest = hashlib.sha256("\0".join(corpus).encode("utf-8", "replace")).hexdigest()[:16]
        return f"{len(corpus)} documents given in Python (sha256 {digest})"
    return str(corpus) if corpus is not None else "small"


def build_features(
    model, tc, *, corpus=None, n_tokens: int = 1_000_000, context_len: int = 128, batch_size: int = 16,
    out: str | os.PathLike, resume: bool = False, top_k: int = 20, window: tuple[int, int] = (16, 8),
    n_ranges: int = 8, per_range: int = 4, checkpoint_every: int = 200, progress: bool = True,
    split: str = "all", seed: int = 0, hist_range: tuple[float, float] = (1e-3, 1e3), hist_bins: int = 48,
    output_write: str = "last", coactivation: int = 0, coact_tokens: int = 0, precision: str = "float32",
    log: Callable[[str], None] | None = None, on_batch: Callable[[int], None] | None = None, dist=None,
) -> Path:
    """Build the feature database of transcoder `tc` on `model` at `out` (see the module docstring).

    corpus: a corpus spec (see `open_corpus`) or a list of documents; its `split` ("all", "train", "eval").
    n_tokens: about how many tokens (ceil(n_tokens / context_len) contexts, fewer if the corpus ends).
    top_k, window (before, after), n_ranges, per_range, hist_range, hist_bins: see `features.stats`.
    output_write: "last" or "sum" (see `features.effects`). log: where messages go (default: stderr).
    precision: "float32" (the transcoder's own arithmetic: every activation is what attribution computes) or
    "bfloat16" (the encoder's matmul in bfloat16, about 4x faster on CPUs with AVX512-BF16 or AMX, at about 3
    significant digits; activations near a feature's threshold may flip; docs/features.md measures it).
    coactivation: M > 0 also keeps, per feature, its M strongest co-activation partners in the same or later
    layers (`features.stats.CoactStats`); coact_tokens: n > 0 measures them on n random tokens per batch.
    on_batch(batches_done): called after each batch (progress for a caller; raising KeyboardInterrupt there
    stops the build like Ctrl-C does).
    dist: a `training.distributed.Dist` (default: the initialised process group, else one process). On many
    processes every rank calls build_features with the same arguments; rank 0 writes the database.
    """
    d = dist if dist is not None else current_dist()
    say = (log or (lambda msg: print(msg, file=sys.stderr, flush=True))) if d.is_main else (lambda msg: None)
    _check_settings(n_tokens=n_tokens, context_len=context_len, batch_size=batch_size, top_k=top_k,
                    window=window, n_ranges=n_ranges, per_range=per_range, checkpoint_every=checkpoint_every,
                    hist_range=hist_range, hist_bins=hist_bins, output_write=output_write,
                    coactivation=coactivation, coact_tokens=coact_tokens, precision=precision)
    tc = tc.eval()
    check_fits(tc, model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = transcoder_fingerprint(tc)
    existing_labels(out, fingerprint)  # refuse early (not after the pass) to overwrite other transcoders' labels
    settings = {
        "model": model.name, "transcoder_sha256": fingerprint, "corpus": corpus_name(corpus), "split": split,
        "context_len": context_len, "batch_size": batch_size, "top_k": top_k, "window": list(window),
        "per_bin": per_range, "hist_range": list(hist_range), "hist_bins": hist_bins, "seed": seed,
    }
    if coactivation:  # only then, so that checkpoints of builds without it still resume
        settings.update(coactivation=coactivation, coact_tokens=coact_tokens)
    if precision != "float32":  # likewise
        settings.update(precision=precision)
    _, _, specials = special_tokens(model.tokenizer)
    stats = FeatureStats(tc.n_layers, tc.n_features, context_len, special_ids=specials, top_k=top_k,
                         window=window, per_bin=per_range, hist_range=hist_range, hist_bins=hist_bins, seed=seed,
                         device=tc.b_enc.device, coactivation=coactivation, coact_tokens=coact_tokens,
                         precision=precision)
    part = partial_dir(out)
    position = Position()
    if resume and d.is_main:
        position = _load_checkpoint(part, stats, settings)
        say(f"resuming {out} after {stats.n_contexts} contexts ({stats.tokens} tokens)")
    elif part.exists() and d.is_main:
        say(f"starting over: removing the unfinished build in {part}")
        shutil.rmtree(part)
    position, seen = d.broadcast_object((position, stats.n_contexts))  # seen: contexts of every rank so far

    def checkpoint() -> None:
        """Merge every rank's share into rank 0, which saves; the other ranks start their share afresh."""
        nonlocal stats
        merged = reduce_stats(stats, d)
        if merged is None:
            stats = stats.empty_like()
        else:
            _save_checkpoint(part, merged, settings, position)

    n_contexts = math.ceil(n_tokens / context_len)
    stream = ContextStream(corpus, model.tokenizer, context_len, split=split, loop=False, start=position)
    bar = _progress_bar(progress and d.is_main, n_contexts * context_len, seen * context_len)
    batches = 0
    stop = _StopOnInterrupt(say)
    try:
        with stop:
            while seen < n_contexts:
                ctxs = stream.take(min(batch_size, n_contexts - seen))
                if not ctxs:
                    say(f"the corpus ended after {seen} contexts of {context_len} tokens")
                    break
                if owns(d, seen // batch_size):  # the batch's index in the corpus order (batches are whole)
                    stats.add_batch(model, tc, torch.tensor(ctxs, dtype=torch.long), ctx0=seen)
                seen += len(ctxs)
                position = stream.position
                batches += 1
                if bar is not None:
                    bar.update(len(ctxs) * context_len)
                if on_batch is not None:
                    try:
                        on_batch(batches)
                    except KeyboardInterrupt:
                        stop.requested = True
                # every rank stops after the same batch; asked once a round of W batches (one per rank), so
                # that the ranks' batches overlap instead of taking turns at a per-batch collective
                if batches % d.world == 0 and d.any(stop.requested):
                    raise KeyboardInterrupt
                if checkpoint_every and batches % checkpoint_every == 0:
                    checkpoint()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()  # before the messages, so they do not land inside the bar's line
        if stop.mid_batch:  # a second Ctrl-C inside a batch: the state may be half updated, keep the last save
            say(f"stopped; the last checkpoint is in {part}: resume with resume=True (`--resume`)")
            raise
        checkpoint()
        say(f"interrupted after {seen} contexts; saved in {part}: run the same build again with resume=True "
            "(`cltrace features build ... --resume`) to continue")
        raise
    finally:
        if bar is not None:
            bar.close()
    if seen == 0:
        raise CltraceError(f"corpus {corpus_name(corpus)} ({split} split) has no context of {context_len} tokens: "
                           "use a larger corpus or a shorter context_len")
    checkpoint()  # the pass is never lost to a failure below
    if not d.is_main:
        return out
    effects = compute_effects(model, tc, stats.mean_final_scale(), write=output_write, progress=progress)
    summary = stats.summary(n_ranges, per_range)
    meta = {
        "model": model.name, "corpus": corpus_name(corpus), "split": split, "settings": settings,
        "transcoder": {"kind": tc.cfg.kind, "n_layers": tc.n_layers, "n_features": tc.n_features,
                       "d_model": tc.d_model, "activation": tc.cfg.activation, "reads": tc.cfg.reads,
                       "model_name": tc.cfg.model_name},
        "histogram": {"lo": hist_range[0], "hi": hist_range[1], "bins": hist_bins},
        "precision": precision,
        "output_effects": {"write": output_write, "final_norm": "frozen at the mean 1/rms over the pass's tokens"},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cltrace_version": _version(),
    }
    vocab = model.tokenizer.batch_decode([[i] for i in range(min(len(model.tokenizer), model.vocab_size))])
    save_database(out, summary, effects, meta=meta, vocab=vocab, fingerprint=fingerprint)
    shutil.rmtree(part, ignore_errors=True)
    return out


def compute_effects(model, tc, final_scale: float, *, n: int = 10, write: str = "last",
                    progress: bool = False) -> Effects:
    """Output and input effects of every feature (see `features.effects`)."""
    ot_i, ot_v, ob_i, ob_v = output_effects(model, tc, final_scale, n=n, write=write, progress=progress)
    in_i, in_v = input_effects(model, tc, n=n, progress=progress)
    return Effects(ot_i, ot_v, ob_i, ob_v, in_i, in_v, final_scale, write)


# ---------------------------------------------------------------------- checkpoints
def _save_checkpoint(part: Path, stats: FeatureStats, settings: dict, position: Position) -> None:
    """state.safetensors holds the tensors and, in its metadata, everything else (one atomic file);
    progress.json repeats the metadata for people."""
    from safetensors.torch import save_file

    part.mkdir(parents=True, exist_ok=True)
    info = {"settings": settings, "position": position.as_list(), "n_contexts": stats.n_contexts,
            "tokens": stats.tokens}
    tmp = part / (STATE + ".tmp")
    save_file(stats.state_dict(), str(tmp), metadata={"cltrace_features": json.dumps(info)})
    os.replace(tmp, part / STATE)
    (part / PROGRESS).write_text(json.dumps(info, indent=2))


def _load_checkpoint(part: Path, stats: FeatureStats, settings: dict) -> Position:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not (part / STATE).exists():
        raise CltraceError(f"no unfinished build to resume at {part}: run without resume (`--resume`)")
    try:
        with safe_open(str(part / STATE), "pt") as f:
            info = json.loads(f.metadata()["cltrace_features"])
        state = load_file(str(part / STATE))
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CltraceError(f"{part / STATE} is corrupt ({e}): delete {part} and build again") from e
    changed = sorted(k for k in settings if info["settings"].get(k) != settings[k])
    if changed:
        was = ", ".join(f"{k}={info['settings'].get(k)!r}" for k in changed)
        raise SettingError(f"the build in {part} was started with other settings ({was}): use the same ones to "
                           f"resume, or delete {part} to start over", tuple(k for k in changed if k != "model"))
    try:
        stats.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CltraceError(f"{part / STATE} does not match these settings ({e}): delete {part} and build again") \
            from e
    return Position(*info["position"])


# ---------------------------------------------------------------------- helpers
class _StopOnInterrupt:
    """While a build runs, the first Ctrl-C asks it to stop after the batch in flight (it then saves); a second
    one raises KeyboardInterrupt at once. Only the main thread can catch signals; elsewhere nothing changes."""

    def __init__(self, say):
        self.say, self.requested, self.mid_batch, self._old = say, False, False, None

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.mid_batch = True
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping after this batch (Ctrl-C again to stop at once, without saving)")

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _progress_bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="features", dynamic_ncols=True,
                smoothing=0.1)


def _check_settings(**s) -> None:
    positive = ("n_tokens", "batch_size", "top_k", "n_ranges", "per_range", "hist_bins")
    bad = [k for k in positive if s[k] < 1]
    if bad:
        raise SettingError(f"{', '.join(bad)} must be at least 1", tuple(bad))
    if s["context_len"] < 2:
        raise SettingError("context_len must be at least 2 (BOS and one token)", ("context_len",))
    if s["checkpoint_every"] < 0:
        raise SettingError("checkpoint_every must be 0 (only on Ctrl-C and at the end) or more", ("checkpoint_every",))
    if min(s["window"]) < 0 or len(s["window"]) != 2:
        raise SettingError("window must be (before, after) with both ≥ 0", ("window",))
    lo, hi = s["hist_range"]
    if not 0 < lo < hi:
        raise SettingError("hist_range must be (lo, hi) with 0 < lo < hi", ("hist_range",))
    if s["coactivation"] < 0 or s["coact_tokens"] < 0:
        raise SettingError("coactivation and coact_tokens must be 0 (off / every token) or more",
                           ("coactivation", "coact_tokens"))
    if s["precision"] not in PRECISIONS:
        raise SettingError(f"precision must be one of {', '.join(PRECISIONS)}", ("precision",))
    if s["output_write"] not in ("last", "sum"):
        raise SettingError("output_write must be 'last' or 'sum'", ("output_write",))


def _version() -> str:
    try:
        return version("cltrace")
    except PackageNotFoundError:
        return "unknown"
