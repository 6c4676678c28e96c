"""`cltrace train --minutes M`: measure this machine, plan the run (training/plan.py), collect the activation
sample when the plan makes several passes over one, re-plan the training from the time left, then train."""

from __future__ import annotations

import time
from pathlib import Path

from cltrace.data import write_activation_cache
from cltrace.training.config import TrainConfig
from cltrace.training.plan import (
    Plan,
    Rates,
    apply_plan,
    cache_capacity,
    measure_rates,
    measure_step_rate,
    plan_run,
    replan_training,
)
from cltrace.training.trainer import train

CACHE_DIR = "cache"  # the plan's activation sample, inside the run's folder


def plan_for_budget(cfg: TrainConfig, model, minutes: float, *, passes: float, rates: Rates | None = None,
                    log=None) -> Plan:
    """Measure (unless `rates` are given) and plan; the step rate is measured again at the planned batch size
    when the plan had to shrink it (a smaller batch trains fewer tokens a second). A cached sample is capped
    at what 80% of the free disk space under cfg.out holds (`cache_capacity`)."""
    log = log or (lambda *a: None)
    measured = rates is None
    if measured:
        rates = measure_rates(cfg, model)
        log(f"measured: model {rates.stream:.0f} tok/s streamed, {rates.cache_write:.0f} tok/s into a cache; "
            f"training {rates.step:.0f} tok/s at batch {cfg.batch_size}")
    cap = cache_capacity(Path(cfg.out) / CACHE_DIR, model.n_layers, model.d_model)
    plan = plan_run(cfg, minutes, rates, passes=passes, max_cache_tokens=cap)
    if measured and plan.batch_size != cfg.batch_size:
        step = measure_step_rate(cfg, model.n_layers, model.d_model, plan.batch_size)
        log(f"measured: training {step:.0f} tok/s at batch {plan.batch_size}")
        plan = plan_run(cfg, minutes, Rates(rates.stream, rates.cache_write, step), passes=passes,
                        max_cache_tokens=cap)
    if plan.cached and plan.collect_tokens == cap:
        log(f"the disk holds a sample of {cap:,} tokens: {plan.passes:.2f} passes over it")
    return plan


def run_with_budget(cfg: TrainConfig, model, minutes: float, *, passes: float = 1.0, rates: Rates | None = None,
                    log=None, train_fn=None):
    """Plan, collect, re-plan and train as the module docstring says; returns (transcoder, final plan)."""

    log = log or (lambda *a: None)
    train_fn = train_fn or train
    t0 = time.monotonic()
    plan = plan_for_budget(cfg, model, minutes, passes=passes, rates=rates, log=log)
    cache = ""
    if plan.cached:
        cache = str(Path(cfg.out) / CACHE_DIR)
        log(f"plan: {plan.collect_tokens:,} tokens into {cache}, then {plan.passes:g} passes")
        write_activation_cache(model, cfg.corpus or None, cache, plan.collect_tokens, context_len=cfg.context_len,
                               seed=cfg.seed, overwrite=True, progress=cfg.progress,
                               precision=cfg.collect_precision)
        plan = replan_training(plan, time.monotonic() - t0)
    cfg = apply_plan(cfg, plan, cache=cache)
    log(f"plan for {minutes:g} min: {plan.train_tokens:,} training tokens ({plan.passes:g} pass(es) over "
        f"{plan.collect_tokens:,}), {plan.steps} steps of {plan.batch_size}; estimated "
        f"{plan.seconds['total'] / 60:.1f} min")
    return train_fn(cfg, model=model, log=log), plan
