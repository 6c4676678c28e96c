"""Distributed training on CPU with gloo: 2 (or 4) local processes on loopback, each test bounded in time.

Workers are module-level functions started with torch.multiprocessing (spawn); each sets the torchrun
environment variables itself, so `init_distributed` takes the same path as under torchrun. Results come
back through files (torch.save) so that a rank's outcome is read even when another rank failed.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cltrace.training import InMemoryActivations, TrainConfig
from cltrace.training import train as train_run
from cltrace.training.distributed import Dist, FailureGuard, init_distributed, prefetch, shutdown
from cltrace.training.losses import auxk_acts
from cltrace.training.sharding import (
    init_shard,
    shard_transcoder,
    sharded_auxk_acts,
    sharded_forward,
    shared_parameters,
)
from cltrace.transcoders.io import load_transcoder, merge_shards
from cltrace.transcoders.sharded import global_config, load_shard, load_sharded, save_shard, shard_bounds
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

L, D, F, N = 3, 8, 12, 16
LAMBDA = 1e-2
CLIP = 0.5  # small enough to clip: the global norm must be the same sharded or not


# ---------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
    except BaseException as e:  # noqa: BLE001 - reported through the result file
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # Leave no gloo threads alive at interpreter exit (they abort the process: "terminate called without
    # an active exception"), then skip the C++ static destructors altogether: the result is on disk.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world: int, tmp_path: Path, *args, timeout: float = 60.0) -> list:
    """Run fn(rank, *args) on `world` processes; [result of each rank]. Fails (and kills all) on timeout."""
    out = tmp_path / f"results-{fn.__name__}"
    out.mkdir(parents=True)
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, str(out), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} on {world} processes did not finish in {timeout} s")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        if isinstance(res, dict) and "error" in res and not fn.__name__.startswith("fail"):
            pytest.fail(f"rank {r}: {res['traceback']}")
    return results


# ---------------------------------------------------------------------- a reference training step
def make_cfg(activation: str = "jumprelu", **kw) -> TranscoderConfig:
    return TranscoderConfig(kind="clt", n_layers=L, d_model=D, n_features=F, activation=activation,
                            k=kw.pop("k", 3), bandwidth=1.0, **kw)


def full_init(cfg: TranscoderConfig, seed: int = 0) -> Transcoder:
    torch.manual_seed(seed)
    tc = Transcoder(cfg)
    with torch.no_grad():
        tc.log_threshold.fill_(-3.0)  # let features fire on random data
    return tc


def data(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, L, D, generator=g), torch.randn(N, L, D, generator=g)) for _ in range(steps)]


def train(tc: Transcoder, d: Dist, batches, lr: float = 1e-2, opt_state=None):
    """Adam on MSE + λ Σ_f a·‖W_dec‖, clipped: feature sums across shards, gradients averaged over data ranks."""
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    losses, norms = [], []
    for x, y in batches:
        x, y = d.split_batch(x, y)
        fwd = sharded_forward(tc, x, d, sparse="never")
        acts, recon = fwd.acts, fwd.recon
        mse = ((recon - y) ** 2).sum(-1).mean()  # [N, L, D] -> scalar, identical on every feature shard
        penalty = d.sum_over_features((acts * tc.decoder_norms()).sum((1, 2)).mean())  # Σ over all features
        loss = mse + LAMBDA * penalty
        loss.backward()
        d.average_gradients(tc.parameters())
        norms.append(d.clip_grad_norm(tc.parameters(), CLIP, shared=shared_parameters(tc)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return (torch.stack(losses) if losses else torch.zeros(0)), opt


def single_reference(activation: str, steps: int):
    tc = full_init(make_cfg(activation))
    tc.train()
    losses, _ = train(tc, Dist(), data(steps))
    return tc, losses


def aux_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(N, L, F, generator=g), torch.rand(L, F, generator=g) < 0.5


# ---------------------------------------------------------------------- workers
def worker_train(rank: int, feature_shards: int, activation: str, steps: int):
    d = init_distributed(feature_shards, "cpu", timeout_s=60)
    full = full_init(make_cfg(activation))
    tc = shard_transcoder(full, d.fp_rank, d.fp_size) if d.fp_size > 1 else full
    tc.train()
    losses, _ = train(tc, d, data(steps))
    with torch.no_grad():
        fwd = sharded_forward(tc.eval(), data(1, seed=9)[0][0], d)
        recon = fwd.recon
    out = {"state": {k: v.detach().clone() for k, v in tc.state_dict().items()}, "losses": losses,
           "recon": recon, "comm": dict(d.comm_bytes), "fp_rank": d.fp_rank, "dp_rank": d.dp_rank}
    if activation == "topk":  # the other global selections: AuxK over dead features, a layer's minimum
        pre, dead = aux_inputs()
        lo, hi = shard_bounds(F, d.fp_size)[d.fp_rank]
        out["auxk"] = sharded_auxk_acts(pre[..., lo:hi], dead[:, lo:hi], 4, d)
        out["min"] = d.reduce_over_features(pre[..., lo:hi].amin((0, 2)), "min")
    shutdown(d)
    return out


def worker_checkpoint(rank: int, folder: str, steps_before: int, steps_after: int, interrupt: bool):
    """Train, checkpoint (shards + optimizer state per rank), optionally stop and resume from the files."""
    d = init_distributed(2, "cpu", timeout_s=60)
    full = full_init(make_cfg())
    tc = shard_transcoder(full, d.fp_rank, d.fp_size).train()
    batches = data(steps_before + steps_after)
    _, opt = train(tc, d, batches[:steps_before])
    save_shard(tc, folder)
    torch.save(opt.state_dict(), Path(folder) / f"optim-rank{rank}.pt")
    d.barrier()
    if interrupt:  # a fresh shard and optimizer, read back from disk as a resumed run would
        tc = load_shard(folder, d.fp_rank).train()
        state = torch.load(Path(folder) / f"optim-rank{rank}.pt")
        _, opt = train(tc, d, batches[steps_before:], opt_state=state)
    else:
        opt_state = opt.state_dict()
        _, opt = train(tc, d, batches[steps_before:], opt_state=opt_state)
    with torch.no_grad():
        fwd = sharded_forward(tc.eval(), data(1, seed=9)[0][0], d)
        recon = fwd.recon
    shutdown(d)
    return {"recon": recon, "state": {k: v.detach().clone() for k, v in tc.state_dict().items()}}


def fail_on_rank1(rank: int, fail_step: int):
    d = init_distributed(1, "cpu", timeout_s=60)
    tc = full_init(make_cfg()).train()
    steps = 0
    try:
        with FailureGuard(d, grace_s=20) as guard:
            for x, y in data(200):
                guard.check()
                if rank == 1 and steps == fail_step:
                    raise ValueError("bad batch on purpose")
                train(tc, d, [(x, y)])
                steps += 1
    finally:
        shutdown_quietly(d)
    return {"steps": steps}


def shutdown_quietly(d: Dist) -> None:
    try:
        shutdown(d)
    except Exception:  # noqa: BLE001 - the peer is gone
        pass


# ---------------------------------------------------------------------- tests
def test_shard_bounds_cover_features():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(4, 4)[-1] == (3, 4)


def test_single_process_hooks_are_identity():
    d = init_distributed(1, "cpu")
    assert not d.distributed and d.is_main
    t = torch.randn(3, requires_grad=True)
    assert d.sum_over_features(t) is t and d.split_batch(t)[0] is t
    d.average_gradients([torch.nn.Parameter(torch.ones(2))])
    assert not d.comm_bytes


def test_sharded_init_matches_distribution():
    cfg = make_cfg()
    a, b = init_shard(cfg, 0, 2, seed=3), init_shard(cfg, 1, 2, seed=3)
    assert a.n_features + b.n_features == F and not torch.equal(a.W_enc[:, :, :2], b.W_enc[:, :, :2])
    assert a.W_enc.abs().max() <= 1 / F**0.5  # the global F's bound, not the shard's


def test_prefetch_keeps_order_and_raises():
    batches = data(5)
    got = list(prefetch(iter(batches), "cpu", depth=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, batches))

    def broken():
        yield batches[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken(), "cpu"))


def test_data_parallel_equals_single_process(tmp_path):
    steps = 4
    ref, ref_losses = single_reference("jumprelu", steps)
    results = launch(worker_train, 2, tmp_path, 1, "jumprelu", steps)
    for res in results:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # each rank's loss is the mean over its half; their average is the single-process loss
    torch.testing.assert_close((results[0]["losses"] + results[1]["losses"]) / 2, ref_losses, rtol=1e-5, atol=1e-6)
    grad_bytes = results[0]["comm"]["grad"]
    assert grad_bytes == steps * 4 * sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk", "topk"])
def test_feature_sharded_equals_unsharded(tmp_path, activation):
    steps = 3
    ref, ref_losses = single_reference(activation, steps)
    results = launch(worker_train, 2, tmp_path, 2, activation, steps)
    with torch.no_grad():
        fwd = sharded_forward(ref.eval(), data(1, seed=9)[0][0], Dist())
        ref_recon = fwd.recon
    for res in results:
        expect = shard_transcoder(ref, res["fp_rank"], 2).state_dict()
        for k, v in expect.items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(res["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["recon"], ref_recon, rtol=1e-5, atol=1e-5)
    if activation == "topk":
        pre, dead = aux_inputs()
        for res in results:
            lo, hi = shard_bounds(F, 2)[res["fp_rank"]]
            torch.testing.assert_close(res["auxk"], auxk_acts(pre, dead, 4)[..., lo:hi])
            torch.testing.assert_close(res["min"], pre.amin((0, 2)))
        return
    comm = results[0]["comm"]
    assert comm["partial_recon"] == (steps + 1) * N * L * D * 4  # one [N, L, D] all-reduce per step (+ eval)
    assert comm["feature_sums"] == steps * 4 * 2 and "grad" not in comm  # penalty + gradient norm


def test_sharded_checkpoint_merge_load(tmp_path):
    folder = tmp_path / "ckpt"
    results = launch(worker_checkpoint, 2, tmp_path, str(folder), 2, 0, False)
    merged = load_transcoder(merge_shards(folder, tmp_path / "merged"))
    direct = load_sharded(folder)
    x = data(1, seed=9)[0][0]
    with torch.no_grad():
        _, recon = merged.eval()(x)
        _, recon_direct = direct.eval()(x)
    assert torch.equal(recon, recon_direct)
    torch.testing.assert_close(recon, results[0]["recon"], rtol=1e-5, atol=1e-5)
    assert merged.n_features == F and merged.cfg.extra.get("shard") is None


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    straight = launch(worker_checkpoint, 2, tmp_path / "a", str(tmp_path / "a" / "ckpt"), 2, 2, False)
    resumed = launch(worker_checkpoint, 2, tmp_path / "b", str(tmp_path / "b" / "ckpt"), 2, 2, True)
    for a, b in zip(straight, resumed):
        for k in a["state"]:
            torch.testing.assert_close(b["state"][k], a["state"][k], rtol=0, atol=0, msg=k)


def test_failure_on_rank1_stops_rank0_with_its_message(tmp_path):
    t0 = time.monotonic()
    results = launch(fail_on_rank1, 2, tmp_path, 2, timeout=60)
    assert "bad batch on purpose" in results[1]["error"]
    assert results[0]["error"].startswith("RankFailure: rank 1: ValueError: bad batch on purpose")
    assert time.monotonic() - t0 < 60


class SlowStore:
    """A c10d store whose calls take a while with the GIL released, as a TCPStore round trip does."""

    def __init__(self):
        self.inside = threading.Event()

    def check(self, keys) -> bool:
        self.inside.set()
        time.sleep(0.3)
        return False


def test_failure_guard_ends_its_watchdog_on_exit(monkeypatch):
    """Leaving the guard ends its watchdog thread, even one inside a store call, so that the thread never
    holds the last reference to the Dist: freed by that daemon thread while the interpreter shut down, the
    process groups' destructor aborted a good torchrun run ("terminate called without an active exception")."""
    store = SlowStore()
    monkeypatch.setattr("cltrace.training.distributed._default_store", lambda: store)
    d = Dist(rank=1, world=2)
    with FailureGuard(d, poll_s=0.01) as guard:
        assert store.inside.wait(10)  # the watchdog is now inside a store call
    assert not guard._thread.is_alive()
    alive = weakref.ref(d)
    del d, guard
    assert alive() is None  # freed here, by the main thread


def test_merge_shards_cli_and_load_transcoder_reads_shards(tmp_path):
    from cltrace.cli import main

    full = full_init(make_cfg(skip=True))
    with torch.no_grad():
        full.W_skip.normal_()
        full.b_dec.normal_()
    for j in range(3):
        save_shard(shard_transcoder(full, j, 3), tmp_path / "shards")
    direct = load_transcoder(tmp_path / "shards")  # io detects shards.json
    assert main(["-q", "merge-shards", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_transcoder(tmp_path / "merged")
    for k, v in full.state_dict().items():
        assert torch.equal(direct.state_dict()[k], v) and torch.equal(merged.state_dict()[k], v), k
    assert main(["-q", "merge-shards", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_clip_grad_norm_single_matches_torch():
    tc = full_init(make_cfg())
    x, y = data(1)[0]
    _, recon = tc.train()(x)
    ((recon - y) ** 2).mean().backward()
    ref = torch.nn.utils.get_total_norm([p.grad for p in tc.parameters()])
    norm = Dist().clip_grad_norm(tc.parameters(), 1e-3, shared=[tc.b_dec])
    torch.testing.assert_close(norm, ref)
    torch.testing.assert_close(torch.nn.utils.get_total_norm([p.grad for p in tc.parameters()]),
                               torch.tensor(1e-3), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------- the real trainer, distributed
def trainer_cfg(out, activation="jumprelu", **kw) -> TrainConfig:
    base = dict(features_per_layer=F, activation=activation, k=3 if "topk" in activation else 0,
                tokens=64 * 4, batch_size=64, out=str(out), progress=False, device="cpu", log_every=1,
                checkpoint_every=2, norm_tokens=128, seed=0, lr=1e-2, sparsity=1e-2, grad_clip=0.5)
    base.update(kw)
    return TrainConfig(**base)


def trainer_source() -> InMemoryActivations:
    g = torch.Generator().manual_seed(11)
    return InMemoryActivations(torch.randn(512, L, D, generator=g), torch.randn(512, L, D, generator=g) * 0.5)


def worker_trainer(rank: int, cfg: TrainConfig, ref_init: dict | None, resume: bool, until: int | None):
    """Train with `cltrace.training.train` exactly as under torchrun (the Dist comes from the environment).

    ref_init: an unsharded transcoder's initial weights to slice into the shards (equality tests).
    """
    from cltrace.training import trainer as trainer_mod

    if ref_init is not None:  # sharded: start from the slice of the unsharded init
        make = trainer_mod.Trainer.__init__

        def init_with_ref(self, *a, **kw):
            make(self, *a, **kw)
            full = Transcoder(global_config(self.tc.cfg), init=False)
            full.load_state_dict(ref_init)
            with torch.no_grad():
                for p, q in zip(self.tc.parameters(), shard_transcoder(full, self.dist.fp_rank,
                                                                       self.dist.fp_size).parameters()):
                    p.copy_(q)

        trainer_mod.Trainer.__init__ = init_with_ref
    tc = train_run(cfg, source=trainer_source(), model_name="tiny", resume=resume, until_step=until)
    return {"state": {k: v.detach().clone() for k, v in tc.state_dict().items()}}


def reference_run(out, **kw):
    from cltrace.training import Trainer

    cfg = trainer_cfg(out, **kw)
    init = Trainer(cfg, trainer_source()).tc.state_dict()
    return train_run(cfg, source=trainer_source(), model_name="tiny"), {k: v.clone() for k, v in init.items()}


# ReLU here: JumpReLU's threshold makes the result discontinuous in the weights, so the ~1e-8 differences of a
# different summation order (two halves vs one batch) can flip a feature near its threshold now and then.
# The primitive-level tests above cover JumpReLU with thresholds far from the data.
def test_trainer_data_parallel_equals_single_process(tmp_path):
    ref, _ = reference_run(tmp_path / "single", activation="relu")
    launch(worker_trainer, 2, tmp_path, trainer_cfg(tmp_path / "dp", activation="relu"), None, False, None)
    got = load_transcoder(tmp_path / "dp")  # written by rank 0 only
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    metrics = (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4  # one writer: rank 0


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_trainer_feature_sharded_equals_unsharded(tmp_path, activation):
    ref, init = reference_run(tmp_path / "single", activation=activation)
    cfg = trainer_cfg(tmp_path / "fs", activation=activation, feature_shards=2)
    launch(worker_trainer, 2, tmp_path, cfg, init, False, None)
    assert sorted(p.name for p in (tmp_path / "fs").glob("shard-*.safetensors")) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    got = load_transcoder(tmp_path / "fs")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    x = trainer_source().x[:32]
    with torch.no_grad():
        torch.testing.assert_close(got.eval()(x)[1], ref.eval()(x)[1], rtol=1e-4, atol=1e-5)


def test_trainer_sharded_resume_after_interruption(tmp_path):
    cfg = trainer_cfg(tmp_path / "straight", feature_shards=2)
    launch(worker_trainer, 2, tmp_path / "a", cfg, None, False, None)
    cfg = trainer_cfg(tmp_path / "resumed", feature_shards=2)
    launch(worker_trainer, 2, tmp_path / "b", cfg, None, False, 2)  # stops after the step-2 checkpoint
    assert (tmp_path / "resumed" / "checkpoints" / "shard-1" / "LATEST").exists()
    assert not (tmp_path / "resumed" / "shards.json").exists()
    launch(worker_trainer, 2, tmp_path / "c", cfg, None, True, None)
    a, b = load_transcoder(tmp_path / "straight"), load_transcoder(tmp_path / "resumed")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_torchrun_cli_feature_sharded_then_merge(tmp_path):
    """The documented command: `torchrun --nproc_per_node 2 -m cltrace train ... --feature-shards 2`."""
    import subprocess
    import sys

    from cltrace.models.tiny import save_tiny

    model_dir = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "cltrace", "--device", "cpu", "-q", "train", "--model", str(model_dir), "-F", "16",
           "--tokens", "512", "--batch-size", "128", "--context-len", "32", "--out", str(out),
           "--feature-shards", "2", "--set", "norm_tokens=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(out)  # printed by rank 0 only
    assert (out / "shards.json").exists() and len(list(out.glob("shard-*.safetensors"))) == 2
    from cltrace.cli import main

    assert main(["-q", "merge-shards", str(out), "--out", str(tmp_path / "merged")]) == 0
    tc = load_transcoder(tmp_path / "merged")
    assert tc.n_features == 16 and tc.n_layers == load_transcoder(out).n_layers


# ---------------------------------------------------------------------- data parallel over shares of the corpus
class UnionOfShares:
    """The single-process reference: each batch is the concatenation of the shares' batches of the same step."""

    def __init__(self, shares):
        self.shares = shares
        self.n_layers, self.d_model = shares[0].n_layers, shares[0].d_model

    def batches(self, batch_size: int, *, seed: int = 0, track: bool = True):
        its = [s.batches(batch_size, seed=seed, track=track) for s in self.shares]  # each: batch_size / W rows
        for parts in zip(*its):
            yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def share_sources(kind: str, cfg: TrainConfig, world: int = 2):
    from cltrace.data import CachedActivations, StreamingActivations
    from cltrace.models.registry import load_model

    if kind == "cache":
        return [CachedActivations(cfg.cache, rank=r, world=world) for r in range(world)]
    model = load_model(cfg.model, device="cpu")
    return [StreamingActivations(model, cfg.corpus or None, context_len=cfg.context_len,
                                 buffer_tokens=cfg.shuffle_buffer, rank=r, world=world) for r in range(world)]


def share_cfg(tmp_path: Path, out: Path, kind: str, **kw) -> TrainConfig:
    """A real source as `train` builds it (cache, or streaming from a tiny model); ReLU (see the note above)."""
    from cltrace.models.tiny import save_tiny

    root = tmp_path.parent if out.parent != tmp_path else tmp_path
    model_dir = root / "tiny"
    if not model_dir.exists():
        save_tiny("llama", model_dir)
    if kind == "cache":
        from cltrace.data import write_activation_cache
        from cltrace.models.registry import load_model

        cache = root / "cache"
        if not cache.exists():
            write_activation_cache(load_model(str(model_dir), device="cpu"), None, cache, 1024, context_len=16,
                                   shard_tokens=200, progress=False)
        src = {"cache": str(cache)}
    else:
        src = {"model": str(model_dir), "context_len": 16, "shuffle_buffer": 256}
    return trainer_cfg(out, activation="relu", checkpoint_minutes=0, **src, **kw)


def worker_trainer_shares(rank: int, cfg: TrainConfig, resume: bool, until: int | None):
    """`train` builds its own source, as under torchrun: this data rank's share of the corpus."""
    from cltrace.training import trainer as trainer_mod

    seen = {}
    run_step = trainer_mod.Trainer.train_step

    def recording(self, x, y):  # what this rank trains on
        seen.setdefault("rows", []).append(x.clone())
        seen["share"] = (self.source.rank, self.source.world, self.source_share)
        return run_step(self, x, y)

    trainer_mod.Trainer.train_step = recording
    tc = train_run(cfg, model_name="tiny", resume=resume, until_step=until)
    return {"state": {k: v.detach().clone() for k, v in tc.state_dict().items()}, "share": seen.get("share"),
            "rows": torch.cat(seen["rows"]) if "rows" in seen else None}


@pytest.mark.parametrize("kind", ["cache", "stream"])
def test_trainer_data_parallel_shares_equal_single_process_on_their_union(tmp_path, kind):
    """Each rank streams its own share (disjoint: tests/test_data.py); 2 ranks = 1 process on the union."""
    cfg = share_cfg(tmp_path, tmp_path / "dp", kind)
    results = launch(worker_trainer_shares, 2, tmp_path, cfg, False, None, timeout=90)
    assert [r["share"] for r in results] == [(0, 2, True), (1, 2, True)]
    assert all(r["rows"].shape[0] == 4 * 32 for r in results)  # 4 steps of 64 / 2 rows, computed by the rank
    single = share_cfg(tmp_path, tmp_path / "single", kind)
    union = UnionOfShares(share_sources(kind, single))
    ref = train_run(single, source=union, model_name="tiny")
    got = load_transcoder(tmp_path / "dp")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_trainer_data_parallel_shares_resume_exactly(tmp_path):
    straight = share_cfg(tmp_path, tmp_path / "straight", "cache")
    launch(worker_trainer_shares, 2, tmp_path / "a", straight, False, None, timeout=90)
    cfg = share_cfg(tmp_path, tmp_path / "resumed", "cache")
    launch(worker_trainer_shares, 2, tmp_path / "b", cfg, False, 2, timeout=90)  # stops after the step-2 checkpoint
    from cltrace.training.checkpoint import latest_checkpoint, load_checkpoint

    _, meta = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert [s["config"]["share"] for s in meta["source_shares"]] == [[0, 2], [1, 2]]  # each rank's own position
    launch(worker_trainer_shares, 2, tmp_path / "c", cfg, True, None, timeout=90)
    a, b = load_transcoder(tmp_path / "straight"), load_transcoder(tmp_path / "resumed")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------- clipping by the global norm
def worker_clip(rank: int, feature_shards: int):
    """One backward on this rank's rows and features, averaged over data ranks, clipped by the global norm."""
    d = init_distributed(feature_shards, "cpu", timeout_s=60)
    full = full_init(make_cfg(skip=True))
    tc = shard_transcoder(full, d.fp_rank, d.fp_size) if d.fp_size > 1 else full
    x, y = d.split_batch(*data(1, seed=4)[0])
    fwd = sharded_forward(tc.train(), x, d, sparse="never")
    acts, recon = fwd.acts, fwd.recon
    penalty = d.sum_over_features((acts * tc.decoder_norms()).sum((1, 2)).mean())
    (((recon - y) ** 2).sum(-1).mean() + LAMBDA * penalty).backward()
    d.average_gradients(tc.parameters())
    norm = d.clip_grad_norm(tc.parameters(), CLIP, shared=shared_parameters(tc))
    grads = {k: p.grad.clone() for k, p in tc.named_parameters()}
    shutdown(d)
    return {"norm": norm, "grads": grads, "fp_rank": d.fp_rank}


@pytest.mark.parametrize("world,feature_shards", [(2, 2), (4, 2)])  # feature shards; 2 x 2 mesh
def test_sharded_clipping_equals_unsharded(tmp_path, world, feature_shards):
    full = full_init(make_cfg(skip=True))
    x, y = data(1, seed=4)[0]
    fwd = sharded_forward(full.train(), x, Dist(), sparse="never")
    acts, recon = fwd.acts, fwd.recon
    (((recon - y) ** 2).sum(-1).mean() + LAMBDA * (acts * full.decoder_norms()).sum((1, 2)).mean()).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(full.parameters(), CLIP)
    assert ref_norm > 2 * CLIP  # clipping acts: a rank using only its own norm would scale differently
    results = launch(worker_clip, world, tmp_path, feature_shards, timeout=90)
    for res in results:
        torch.testing.assert_close(res["norm"], ref_norm, rtol=1e-5, atol=1e-6)
        lo, hi = shard_bounds(F, feature_shards)[res["fp_rank"]]
        for k, g in res["grads"].items():
            want = full.get_parameter(k).grad
            if k in ("W_enc", "b_enc", "log_threshold"):
                want = want[..., lo:hi]
            elif k.startswith("W_dec."):
                want = want[lo:hi]
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=k)
