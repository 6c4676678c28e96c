"""`--minutes` budgets (training/plan.py, training/budget.py): the plan's arithmetic, and a planned run on a tiny
model trains exactly what the plan says (steps, tokens, cache size, LR schedule). Tested by the plan, not by
the clock: rates are given or measured, never asserted on."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from cltrace.errors import CltraceError
from cltrace.models.tiny import tiny_model
from cltrace.training import TrainConfig
from cltrace.training.plan import Rates, apply_plan, cache_capacity, plan_run, replan_training
from cltrace.training.schedule import lr_factor, retimed_steps

RATES = Rates(stream=500.0, cache_write=400.0, step=3000.0)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"features_per_layer": 512, "batch_size": 1024, "norm_tokens": 8192, **kw})


def _cost(plan, cfg, rates, overhead_s=15.0) -> float:
    """Seconds the plan's run costs, computed here from the rates (independently of plan.seconds)."""
    if plan.cached:
        collect = plan.collect_tokens / rates.cache_write
        norm = cfg.norm_tokens / 50_000.0
    else:
        collect = plan.train_tokens / rates.stream
        norm = cfg.norm_tokens / rates.stream
    return collect + plan.train_tokens / rates.step + norm + overhead_s


@pytest.mark.parametrize("passes", [1.0, 4.0])
@pytest.mark.parametrize("minutes", [4.0, 10.0])
def test_plan_fills_the_budget_and_no_more(minutes, passes):
    cfg = _cfg()
    plan = plan_run(cfg, minutes, RATES, passes=passes)
    budget = 0.9 * minutes * 60
    cost = _cost(plan, cfg, RATES)
    assert cost <= budget + 1e-6 and plan.seconds["total"] == pytest.approx(cost)
    # one more batch would not fit: the plan spends the budget
    one_more = plan.batch_size * (1 / RATES.step + (1 / (passes * RATES.cache_write) if plan.cached
                                                    else 1 / RATES.stream))
    assert cost + one_more > budget - plan.batch_size / RATES.step  # within a batch of the budget
    assert plan.train_tokens == plan.steps * plan.batch_size
    if passes > 1:
        assert plan.cached and plan.collect_tokens == math.ceil(plan.train_tokens / passes)
    else:
        assert not plan.cached and plan.collect_tokens == plan.train_tokens
    # the schedule of the planned config is a schedule over exactly the planned steps
    run = apply_plan(cfg, plan, cache="somewhere")
    assert run.tokens == plan.train_tokens and run.steps == plan.steps and run.batch_size == plan.batch_size
    assert run.cache == ("somewhere" if passes > 1 else "") and run.extra["plan"]["steps"] == plan.steps
    assert lr_factor(run.steps - 1, run.steps, run.warmup, run.decay, run.min_lr) == pytest.approx(run.min_lr)


def test_more_passes_train_more_tokens_and_collect_fewer():
    one, four = plan_run(_cfg(), 6, RATES, passes=1), plan_run(_cfg(), 6, RATES, passes=4)
    assert four.train_tokens > one.train_tokens and four.collect_tokens < one.collect_tokens


def test_short_budgets_shrink_the_batch_to_keep_steps():
    slow = Rates(stream=100.0, cache_write=100.0, step=400.0)
    plan = plan_run(_cfg(batch_size=4096), 5, slow, passes=1, min_steps=100, min_batch=256)
    assert plan.batch_size < 4096 and (plan.steps >= 100 or plan.batch_size == 256)
    assert plan.batch_size & (plan.batch_size - 1) == 0 or plan.batch_size == 4096 // 2 ** round(
        math.log2(4096 / plan.batch_size))
    with pytest.raises(ValueError, match="give more minutes"):
        plan_run(_cfg(), 0.2, slow)


def test_replan_fills_the_time_left_after_the_collection():
    """After a slow collection the run trains less, after a fast one more (more passes over the same sample);
    either way its training fits in the safety share of the time left, within one batch."""
    plan = plan_run(_cfg(), 8, RATES, passes=4)
    for factor in (1.0, 1.3, 0.5):  # the collection took what was estimated, 30% longer, or half the estimate
        used = factor * plan.seconds["collect"]
        re = replan_training(plan, used)
        # as estimated: the plan's steps, plus the slack of its rounding to whole batches (at most 2 here)
        assert {1.0: plan.steps <= re.steps <= plan.steps + 2, 1.3: re.steps < plan.steps,
                0.5: re.steps > plan.steps}[factor] and re.cached
        assert re.train_tokens == re.steps * re.batch_size and re.collect_tokens == plan.collect_tokens
        assert re.passes == pytest.approx(re.train_tokens / plan.collect_tokens)
        assert re.seconds["collect"] == used and re.seconds["total"] <= 0.9 * 8 * 60.0
        left = 0.9 * 8 * 60.0 - used  # what is left of the budget's safety share
        overhead = 15.0 + _cfg().norm_tokens / 50_000.0  # the cached run's normalization pass comes after
        assert left - re.batch_size / RATES.step < re.train_tokens / RATES.step + overhead <= left


def steps_take(monkeypatch, rate: float) -> list:
    """The trainer's clock, faked: each optimizer step takes batch_size / rate seconds (the plan's step rate, so
    a time-budgeted run's retiming keeps the planned steps; another rate moves them). Returns the clock."""
    import types

    from cltrace.training import trainer as trainer_mod

    clock = [0.0]
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    step = trainer_mod.Trainer.train_step

    def timed_step(self, x, y):
        clock[0] += self.cfg.batch_size / rate
        return step(self, x, y)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", timed_step)
    return clock


def test_a_planned_run_on_a_tiny_model_trains_what_the_plan_says(tmp_path, monkeypatch):
    from cltrace.models.tiny import tiny_model
    from cltrace.training.budget import run_with_budget
    from cltrace.training.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint
    from cltrace.training.metrics import read_metrics
    from cltrace.training.plan import measure_rates

    model = tiny_model("llama")
    cfg = TrainConfig(kind="clt", features_per_layer=32, activation="batchtopk", k=4, batch_size=256,
                      norm_tokens=512, context_len=64, out=str(tmp_path / "run"), progress=False, log_every=1)
    measured = measure_rates(cfg, model)
    assert all(math.isfinite(r) and r > 0 for r in (measured.stream, measured.cache_write, measured.step))
    rates = Rates(stream=60.0, cache_write=50.0, step=300.0)  # slow rates: a plan of a few steps
    steps_take(monkeypatch, rates.step)
    tc, plan = run_with_budget(cfg, model, 0.5, passes=3, rates=rates)
    assert plan.cached and plan.steps >= 2
    manifest = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())
    assert manifest["n_tokens"] >= plan.collect_tokens
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == plan.steps and rows[-1]["tokens"] == plan.train_tokens
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["tokens"] == plan.train_tokens and saved["cache"].endswith("cache")
    assert saved["extra"]["plan"]["steps"] == plan.steps
    _, meta = load_checkpoint(latest_checkpoint(checkpoint_root(tmp_path / "run")))
    assert meta["step"] == plan.steps
    assert saved["train_seconds"] == pytest.approx(plan.seconds["train"])  # retimed twice, to the same steps
    retimed = saved["extra"]["retimed"]  # at 5% and 50% of the steps (one point when they are the same step)
    assert 1 <= len(retimed) <= 2 and all(r["steps"] == plan.steps for r in retimed)


@pytest.mark.parametrize("speed", [0.5, 3.0])
def test_a_run_that_steps_faster_or_slower_than_planned_is_retimed_to_end_on_time(tmp_path, monkeypatch, speed):
    """Training at `speed` times the planned step rate: at 5% and 50% of the planned steps the run moves its
    token count to end train_seconds after it began (retimed_steps, checked here by hand), finishes, saves the
    count it trained, and its LR schedule ends where it stops."""
    from cltrace.training.metrics import read_metrics
    from cltrace.training.trainer import train

    model = tiny_model("llama")
    batch, planned, rate = 64, 40, 640.0
    cfg = TrainConfig(kind="clt", features_per_layer=32, activation="batchtopk", k=4, batch_size=batch,
                      tokens=planned * batch, train_seconds=planned * batch / rate, norm_tokens=256,
                      context_len=32, out=str(tmp_path / "run"), progress=False, log_every=1, checkpoint_every=0)
    steps_take(monkeypatch, rate * speed)
    train(cfg, model=model)
    per_step = batch / (rate * speed)
    first = 2  # 5% of 40 steps
    after_first = max(first + 1, math.floor(first * cfg.train_seconds / (first * per_step) + 1e-6))
    second = 20  # 50% of the planned 40
    expected = max(second + 1, math.floor(second * cfg.train_seconds / (second * per_step) + 1e-6))
    expected = expected if second < after_first else after_first  # a run cut to 20 steps or fewer ends first
    assert expected == round(planned * speed) != planned  # so the lines above can fail
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == expected and rows[-1]["tokens"] == expected * batch
    assert (tmp_path / "run" / "transcoder.safetensors").exists()  # finalized, also when cut short
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["tokens"] == expected * batch and saved["extra"]["retimed"][0]["step"] == first
    assert rows[-1]["lr"] == pytest.approx(cfg.lr * lr_factor(expected - 1, expected, cfg.warmup, cfg.decay,
                                                              cfg.min_lr))


def test_an_interrupted_retimed_run_resumes_to_the_retimed_count(tmp_path, monkeypatch):
    """A retimed run stopped after a checkpoint resumes from its saved config (what `cltrace train --resume`
    loads) to the count it was retimed to, without retiming again; the original config is refused by name."""
    from cltrace.training.config import CONFIG_FILE
    from cltrace.training.metrics import read_metrics
    from cltrace.training.trainer import train

    model = tiny_model("llama")
    cfg = TrainConfig(kind="clt", features_per_layer=32, activation="batchtopk", k=4, batch_size=64, tokens=40 * 64,
                      train_seconds=40 * 64 / 640.0, norm_tokens=256, context_len=32, out=str(tmp_path / "run"),
                      progress=False, log_every=1, checkpoint_every=10)
    steps_take(monkeypatch, 3 * 640.0)  # three times the planned rate: retimed to 120 steps at step 2
    train(cfg, model=model, until_step=30)  # "interrupted" after the checkpoint at step 30
    saved = TrainConfig.load(tmp_path / "run" / CONFIG_FILE)
    assert saved.steps == 120 and len(saved.extra["retimed"]) == 2  # at steps 2 and 20
    with pytest.raises(CltraceError, match="tokens: saved 7680, now 2560"):
        train(cfg, model=model, resume=True)
    train(saved, model=model, resume=True)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 120 and (tmp_path / "run" / "transcoder.safetensors").exists()
    assert len(TrainConfig.load(tmp_path / "run" / CONFIG_FILE).extra["retimed"]) == 2  # not retimed again


def test_retimed_steps():
    assert retimed_steps(10, 5.0, 60.0) == 120  # 2 steps a second for 60 s
    assert retimed_steps(10, 5.0, 2.0) == 11  # over budget already: one more step, never stop where it stands
    assert retimed_steps(3, 3 * 0.1, 3 * 0.1 * 7) == 21  # a whole ratio in floating point stays whole
    with pytest.raises(ValueError):
        retimed_steps(0, 1.0, 10.0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(CltraceError, match="train_seconds must be 0"):
            TrainConfig(train_seconds=bad).validate()


def test_cli_minutes_plans_with_the_recipe(tmp_path, monkeypatch, capsys):
    from cltrace.cli import main
    from cltrace.models.tiny import save_tiny
    from cltrace.training import budget

    monkeypatch.setattr(budget, "measure_rates", lambda cfg, model: Rates(stream=80.0, cache_write=60.0, step=400.0))
    monkeypatch.setattr(budget, "measure_step_rate", lambda *a, **k: 400.0)
    steps_take(monkeypatch, 400.0)
    model_dir = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "tc"
    rc = main(["-q", "train", "--model", str(model_dir), "-F", "32", "--minutes", "0.5", "--passes", "1",
               "--k", "4", "--context-len", "64", "--set", "norm_tokens=256", "--out", str(out)])
    assert rc == 0 and (out / "transcoder.safetensors").exists()
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    from cltrace.training.recipe import RECIPE

    assert saved["activation"] == RECIPE["activation"] and saved["lr"] == RECIPE["lr"]  # the recipe's defaults
    assert saved["k"] == 4  # a named flag still wins
    plan = saved["extra"]["plan"]
    assert saved["tokens"] == plan["train_tokens"] and not plan["cached"] and saved["cache"] == ""
    assert read_last_step(out) == plan["steps"]
    assert main(["-q", "train", "--minutes", "-1", "--model", str(model_dir), "--out", str(tmp_path / "z")]) == 2


def read_last_step(out) -> int:
    from cltrace.training.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")[-1]["step"]


def test_a_token_budget_gets_the_recipe_too_and_a_config_file_does_not(tmp_path):
    """`cltrace train --tokens N` starts from the recipe like `--minutes`; --set and named flags override it;
    --config FILE starts from TrainConfig's own defaults (a saved config reproduces its run)."""
    import argparse

    from cltrace.cli import train as train_cli
    from cltrace.training.recipe import RECIPE

    parser = argparse.ArgumentParser()
    parser.add_argument("-q", dest="quiet", action="store_true")
    train_cli.add_parser(parser.add_subparsers(), "train")

    def config(*argv):
        return train_cli.build_config(parser.parse_args(["train", *argv]))

    cfg = config("--tokens", "2e5")
    assert cfg.tokens == 200_000
    assert {key: getattr(cfg, key) for key in RECIPE} == RECIPE
    assert RECIPE != {key: getattr(TrainConfig(), key) for key in RECIPE}  # so the line above can fail
    cfg = config("--tokens", "2e5", "--k", "7", "--set", "lr=5e-4")
    assert (cfg.k, cfg.lr, cfg.activation) == (7, 5e-4, RECIPE["activation"])
    saved = tmp_path / "cfg.yaml"
    TrainConfig(tokens=300_000).save(saved)
    cfg = config("--config", str(saved))
    assert {key: getattr(cfg, key) for key in RECIPE} == {key: getattr(TrainConfig(), key) for key in RECIPE}
    # on a GPU the decode is left to `auto` (dense under bf16); everything else is the recipe
    gpu = train_cli.build_config(parser.parse_args(["train", "--tokens", "2e5"]), device="cuda:0")
    assert RECIPE["sparse_decode"] != "auto" and gpu.sparse_decode == "auto"
    assert {key: getattr(gpu, key) for key in RECIPE if key != "sparse_decode"} == {
        key: v for key, v in RECIPE.items() if key != "sparse_decode"}


def test_the_recipe_collects_in_bf16_where_bf16_is_native(monkeypatch):
    """collect_precision is bf16 exactly where runtime.fast_bf16 says bf16 matmuls are native (on other CPUs
    bf16 autocast is emulated and slower than fp32), and the trainer's streaming source takes it."""
    from cltrace import runtime
    from cltrace.training import recipe as recipe_mod
    from cltrace.training.trainer import open_source

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "fast_bf16", lambda device, native=native: native)
        assert recipe_mod.recipe()["collect_precision"] == expected
        assert recipe_mod.recipe("cuda:0")["collect_precision"] == expected
    model = tiny_model("llama")
    cfg = TrainConfig(model="tiny", tokens=64, batch_size=32, collect_precision="bf16")
    src, _ = open_source(cfg, model=model)
    assert src.precision == "bf16"
    with pytest.raises(CltraceError, match="collect_precision"):
        TrainConfig(collect_precision="fp16").validate()


def test_a_cache_the_disk_cannot_hold_is_capped_and_trained_on_longer(tmp_path):
    """max_cache_tokens caps the sample; the collection time saved goes to training, so more passes over it,
    and the capped plan still fills the budget (its cost computed here from the rates)."""
    cfg = _cfg()
    free = plan_run(cfg, 10, RATES, passes=2)
    cap = free.collect_tokens // 3
    capped = plan_run(cfg, 10, RATES, passes=2, max_cache_tokens=cap)
    assert capped.cached and capped.collect_tokens == cap
    assert capped.train_tokens > free.train_tokens and capped.passes == pytest.approx(capped.train_tokens / cap)
    cost = cap / RATES.cache_write + capped.train_tokens / RATES.step + cfg.norm_tokens / 50_000.0 + 15.0
    assert 0.9 * 600 - 2 * capped.batch_size / RATES.step < cost <= 0.9 * 600 + 1e-6  # fills the budget
    assert plan_run(cfg, 10, RATES, passes=2, max_cache_tokens=10 * free.collect_tokens) == free  # a cap not reached
    # streaming (passes = 1) writes no cache: no cap applies
    assert plan_run(cfg, 10, RATES, passes=1, max_cache_tokens=cap) == plan_run(cfg, 10, RATES, passes=1)
    n = cache_capacity(tmp_path / "not" / "yet", 18, 640)
    assert n == int(0.8 * shutil.disk_usage(tmp_path).free) // (2 * 18 * 640 * 2) > 0
