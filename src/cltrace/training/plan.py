"""A time budget turned into a training run: how many tokens to take from the model, how many passes over
them, the batch size, hence the steps and the LR schedule (a pure function of the steps).

    cost of a run  =  collect / collect_rate  +  train_tokens / step_rate  +  overhead
        streaming (passes = 1):  every token is computed by the model and trained on once
                                 collect = train_tokens, collect_rate = streaming rate (model forward + harvest)
        cached (passes = P > 1): a sample of C tokens is written to an activation cache, then trained on P times
                                 collect = C, collect_rate = cache-writing rate; train_tokens = P · C
        overhead = the normalization pass (norm_tokens through the model when streaming) + a fixed allowance
    the plan spends `safety` of the budget on that sum and leaves the rest as margin.

The rates are measured on this machine just before the run (`measure_rates`: a few model batches, a few
training steps on random rows of the planned shape), or given. `plan_run` is pure: tests check the plan's
arithmetic on a tiny model, not the clock. The trainer then runs the planned token count, so the LR schedule
ends where the budget does; after the cache is written the training part is planned again from the time left
(`replan_training`), so a slow collection shortens training instead of overrunning, and a fast one lengthens it.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cltrace.data import StreamingActivations, write_activation_cache
from cltrace.data.cache import token_bytes
from cltrace.training.config import TrainConfig
from cltrace.training.inmemory import InMemoryActivations
from cltrace.training.trainer import Trainer


@dataclass
class Rates:
    """Measured (or given) throughputs of this machine, tokens per second."""

    stream: float  # activations streamed from the model (forward + harvest), the collection rate of a 1-pass run
    cache_write: float  # activations written to a disk cache (forward + bf16 + write + hash)
    step: float  # training steps on rows already in memory or in a cache, at the planned batch size


@dataclass
class Plan:
    """What a budget buys; `apply_plan` turns it into a TrainConfig."""

    minutes: float  # the budget
    passes: float  # passes over the collected tokens (1 = stream fresh text once)
    collect_tokens: int  # tokens computed by the model (the cache's size when passes > 1)
    train_tokens: int  # tokens trained on = steps · batch_size
    batch_size: int
    steps: int
    rates: Rates
    seconds: dict  # estimated seconds: collect, train, overhead, total (≤ safety · budget)
    cached: bool  # the collected tokens go to an activation cache that training reads (planned passes > 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds"] = {k: round(v, 1) for k, v in self.seconds.items()}
        d["rates"] = {k: round(v, 1) for k, v in d["rates"].items()}
        return d


FIXED_OVERHEAD_S = 15.0  # saving the transcoder, the curves, a checkpoint, the process's own start-up


def plan_run(cfg: TrainConfig, minutes: float, rates: Rates, *, passes: float = 1.0, min_steps: int = 200,
             min_batch: int = 256, safety: float = 0.9, overhead_s: float = FIXED_OVERHEAD_S,
             max_cache_tokens: int | None = None) -> Plan:
    """The run of `cfg`'s shape that fits in `minutes` (see the module docstring).

    Batch: cfg.batch_size, halved (not below min_batch) until the run has at least min_steps optimizer steps:
    on a short budget, steps are what the transcoder lacks. max_cache_tokens (what the disk holds, see
    `cache_capacity`): a cached sample is never larger; the time its collection no longer takes goes to
    training, so the passes over it grow. Raises ValueError when the budget does not cover the overhead and
    one batch.
    """
    if minutes <= 0 or passes < 1:
        raise ValueError("minutes must be positive and passes at least 1")
    budget = safety * minutes * 60.0
    norm_s = cfg.norm_tokens / rates.stream if passes <= 1 else cfg.norm_tokens / 50_000.0  # cached: a read
    overhead = overhead_s + norm_s
    avail = budget - overhead
    # seconds per trained token: a streamed token is computed and trained on; a cached one is computed 1/P times
    collect_rate = rates.stream if passes <= 1 else rates.cache_write
    per_token = 1.0 / (passes * collect_rate) + 1.0 / rates.step
    train_tokens = int(avail / per_token) if avail > 0 else 0
    capped = passes > 1 and max_cache_tokens is not None and math.ceil(train_tokens / passes) > max_cache_tokens
    if capped:  # the sample is as large as the disk allows; the rest of the time trains on it
        train_tokens = int(max(0.0, avail - max_cache_tokens / collect_rate) * rates.step)
    batch = cfg.batch_size
    while batch > min_batch and train_tokens // batch < min_steps:
        batch //= 2
    batch = max(batch, min(min_batch, cfg.batch_size))
    steps = train_tokens // batch
    if steps < 1:
        raise ValueError(f"{minutes} minutes do not cover the run's fixed costs ({overhead:.0f} s) and one batch of "
                         f"{batch} tokens at these rates: give more minutes")
    train_tokens = steps * batch
    collect = train_tokens if passes <= 1 else min(math.ceil(train_tokens / passes), max_cache_tokens or train_tokens)
    if capped:
        passes = train_tokens / collect
    seconds = {"collect": collect / collect_rate, "train": train_tokens / rates.step, "overhead": overhead}
    seconds["total"] = sum(seconds.values())
    return Plan(minutes=minutes, passes=passes, collect_tokens=collect, train_tokens=train_tokens, batch_size=batch,
                steps=steps, rates=rates, seconds=seconds, cached=passes > 1)


def cache_capacity(folder, n_layers: int, d_model: int, *, share: float = 0.8) -> int:
    """Tokens of an activation cache (`data.cache.token_bytes` each) that fit in `share` of the free space of the
    disk holding `folder` (or its nearest existing parent)."""
    where = Path(folder).absolute()
    while not where.exists():
        where = where.parent
    return int(share * shutil.disk_usage(where).free) // token_bytes(n_layers, d_model)


def replan_training(plan: Plan, seconds_used: float, *, safety: float = 0.9) -> Plan:
    """After the collection, which took `seconds_used` since the budget's clock started (measuring included):
    the training tokens that fit in what is left of `safety` of the budget. A slow collection leaves fewer steps
    than planned; a fast one more (more passes over the same sample: the measured cache-writing rate is a few
    seconds' estimate, and 20-minute runs that kept the planned steps finished 5 minutes early)."""
    avail = safety * plan.minutes * 60.0 - seconds_used - plan.seconds["overhead"]  # the normalization: ahead
    fit = int(max(0.0, avail) * plan.rates.step) // plan.batch_size
    steps = max(1, fit)
    # the collection is now a measured time (with the measuring before it), no longer an estimate
    seconds = {**plan.seconds, "collect": seconds_used, "train": steps * plan.batch_size / plan.rates.step}
    seconds["total"] = seconds["collect"] + seconds["train"] + seconds["overhead"]
    tokens = steps * plan.batch_size
    return dataclasses.replace(plan, steps=steps, train_tokens=tokens, seconds=seconds,
                               passes=max(1.0, tokens / plan.collect_tokens) if plan.cached else 1.0)


def apply_plan(cfg: TrainConfig, plan: Plan, *, cache: str = "") -> TrainConfig:
    """cfg with the plan's tokens, training seconds, batch size and data source; the plan is kept in
    extra['plan'].

    Streaming runs get a shuffle buffer of norm_tokens rows, so the normalization pass computes norm_tokens
    rows, not a whole buffer; checkpoints are written by time only (checkpoint_minutes), not every 100 steps.
    """
    changes = {"tokens": plan.train_tokens, "train_seconds": plan.seconds["train"],
               "batch_size": plan.batch_size, "checkpoint_every": 0,
               "extra": {**cfg.extra, "plan": plan.to_dict()}}
    if plan.cached:
        changes["cache"] = cache
    elif not cfg.shuffle_buffer:
        changes["shuffle_buffer"] = max(cfg.norm_tokens, plan.batch_size)
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------- measuring this machine
def measure_rates(cfg: TrainConfig, model, *, batch_size: int | None = None, model_batches: int = 2,
                  steps: int = 2) -> Rates:
    """Time a few model batches (streamed, and written to a throw-away cache) and a few training steps of
    cfg's transcoder on random rows, after one untimed warm-up of each. Takes seconds on a CPU."""

    n = model_batches * 8 * cfg.context_len
    src = StreamingActivations(model, cfg.corpus or None, context_len=cfg.context_len,
                               buffer_tokens=8 * cfg.context_len, precision=cfg.collect_precision)
    batches = src.batches(8 * cfg.context_len // 2, seed=0, track=False)
    next(batches)  # warm-up: the first model batch and the tokenizer
    t = time.perf_counter()
    got = 0
    while got < n:
        x, _ = next(batches)
        got += len(x)
    stream = got / (time.perf_counter() - t)
    batches.close()
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: the writer's own stream tokenizes the corpus' first documents again; untimed, as above
        write_activation_cache(model, cfg.corpus or None, tmp, 8, context_len=cfg.context_len, progress=False,
                               precision=cfg.collect_precision, overwrite=True)
        n_cache = 2 * n  # the writer's fixed costs (files, flush, hash) are per shard: a longer write amortizes them
        t = time.perf_counter()
        write_activation_cache(model, cfg.corpus or None, tmp, n_cache, context_len=cfg.context_len,
                               progress=False, precision=cfg.collect_precision, overwrite=True)
        cache_write = n_cache / (time.perf_counter() - t)
    return Rates(stream=stream, cache_write=cache_write,
                 step=measure_step_rate(cfg, model.n_layers, model.d_model, batch_size or cfg.batch_size, steps))


def measure_step_rate(cfg: TrainConfig, n_layers: int, d_model: int, batch_size: int, steps: int = 2) -> float:
    """Tokens per second of `steps` training steps of cfg's transcoder at batch_size, on random rows."""

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, n_layers, d_model, generator=g)
    y = torch.randn(batch_size, n_layers, d_model, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        probe = dataclasses.replace(cfg, out=tmp, progress=False, tokens=max(cfg.tokens, batch_size),
                                    batch_size=batch_size, cache="", resample_every=0)
        tr = Trainer(probe, InMemoryActivations(x, y))
        tr.train_step(x, y)  # warm-up: allocations, the fused kernels
        t = time.perf_counter()
        for _ in range(steps):
            tr.train_step(x, y)
        rate = steps * batch_size / (time.perf_counter() - t)
    del tr
    return rate
