"""Dead-feature resampling (training/resample.py): a resampled feature is re-initialized as documented and nothing
else changes (every other parameter, AdamW moment and statistic keeps its bits); resume = uninterrupted with
resampling on; it revives features in a real run. Tiny sizes on synthetic data."""

from __future__ import annotations

import pytest
import torch
from test_training import cfg_for, synthetic

from cltrace.training import InMemoryActivations, Trainer, train
from cltrace.training.checkpoint import checkpoint_root, latest_checkpoint
from cltrace.training.resample import resample_dead, resample_generator, token_errors


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, AdamW moment (in the parameter's shape) and feature statistic, copied."""
    out = {f"tc.{k}": v.detach().clone() for k, v in trainer.tc.state_dict().items()}
    opt, _ = trainer.opt.state_to_flat()
    out.update({k: v.clone() for k, v in opt.items()})
    out.update({k: v.clone() for k, v in trainer.stats.state().items()})
    return out


def _owned_by(name: str, shape, dead: torch.Tensor, activation: str) -> torch.Tensor:
    """bool mask of `shape`: the entries of parameter `name` (or of its moments) that belong to the dead features."""
    if name == "W_enc":
        return dead[:, None, :].expand(shape).clone()
    if name == "b_enc" or (name == "log_threshold" and activation == "jumprelu"):
        return dead.clone()
    m = torch.zeros(shape, dtype=torch.bool)
    if name.startswith("W_dec."):
        m[dead[int(name.split(".")[1])]] = True
    return m


@pytest.mark.parametrize("kind,activation,k", [("clt", "batchtopk", 3), ("plt", "jumprelu", 0), ("clt", "jumprelu", 0)])
def test_resample_reinitializes_the_dead_features_and_changes_nothing_else(tmp_path, kind, activation, k, device):
    x, y = synthetic(512, device=device)
    cfg = cfg_for(tmp_path, kind=kind, activation=activation, k=k, device=device, checkpoint_every=0)
    tr = Trainer(cfg, InMemoryActivations(x, y))
    tr.initialize()
    tr.run(until_step=6)  # AdamW has moments everywhere
    L, F = tr.tc.n_layers, tr.tc.n_features
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[0, [1, 5]] = True
    dead[2, [0, 7, 15]] = True  # layer 1: none; layer 2 of a CLT writes to itself only
    tr.stats.since_fired[dead.to(tr.stats.since_fired.device)] = 10**9
    before = _snapshot(tr)
    # one batch, normalized as the trainer does, with an error that makes token 3 (layer 0) and 9 (layer 2) certain
    xb = tr._normalized(x[:64], tr.x_scale)
    yb = tr._normalized(y[:64], tr.y_scale)
    recon = yb.clone()
    recon[3, 0] += 5.0
    recon[9, 2] += 5.0
    counts = resample_dead(tr.tc, tr.opt, tr.stats, tr.stats.dead(cfg.dead_tokens), xb, token_errors(recon, yb),
                           resample_generator(cfg.seed, 6))
    assert counts.tolist() == [2, 0, 3]
    after = _snapshot(tr)
    assert after.keys() == before.keys()

    # exactly as documented
    enc0 = before["tc.W_enc"].norm(dim=1)  # [L, F] column norms before
    for s, tok in ((0, 3), (2, 9)):
        # a PLT's layer-0 feature writes to layer 0 only, a CLT's to layers 0..2: the error at layer 0 decides both
        idx = dead[s].nonzero().squeeze(-1)
        scale = enc0[s][~dead[s]].mean()
        want = (xb[tok, s] / xb[tok, s].norm() * scale).cpu()
        for i in idx.tolist():
            assert torch.allclose(after["tc.W_enc"][s, :, i].cpu(), want, atol=1e-6)
            assert after["tc.b_enc"][s, i] == 0
            assert (after[f"tc.W_dec.{s}"][i] == 0).all()
            if activation == "jumprelu":
                assert after["tc.log_threshold"][s, i] == before["tc.log_threshold"][s][~dead[s]].median()
            assert after["stats.since_fired"][s, i] == 0 and after["stats.frequency"][s, i] == 0
    names = [k for k, _ in tr.tc.named_parameters()]
    checked_moments = 0
    for key in after:
        if key.startswith("tc."):
            mask = _owned_by(key[3:], after[key].shape, dead, activation)
        elif key in ("stats.since_fired", "stats.frequency"):
            mask = dead.clone()
        elif key.startswith("optim.") and key.split(".")[2] in ("exp_avg", "exp_avg_sq"):
            mask = _owned_by(names[int(key.split(".")[1])], after[key].shape, dead, activation)
            if mask.any():
                assert (after[key][mask] == 0).all(), key  # the dead features' moments are reset
                assert (before[key][mask] != 0).any(), key  # (and were not zero before)
                checked_moments += 1
        else:  # step counters, stats.updates: untouched
            mask = torch.zeros(after[key].shape, dtype=torch.bool)
        mask = mask.to(after[key].device)
        assert torch.equal(after[key][~mask], before[key][~mask]), key  # everything else keeps its bits
    assert checked_moments >= 2 * (1 + 1 + 2)  # W_enc, b_enc, W_dec of layers 0 and 2: both moments


@pytest.mark.parametrize("activation,k", [("jumprelu", 0), ("batchtopk", 1)])
def test_resume_equals_uninterrupted_with_resampling(tmp_path, activation, k, device):
    x, y = synthetic(512, device=device)
    kw = dict(activation=activation, k=k, device=device, resample_every=4, dead_tokens=64, resample_until=1.0,
              init_l0=1, sparsity=0.05)  # sparse enough that some features die and are resampled
    full = train(cfg_for(tmp_path, "a", **kw), source=InMemoryActivations(x, y))
    cfg_b = cfg_for(tmp_path, "b", **kw)
    train(cfg_b, source=InMemoryActivations(x, y), until_step=10)
    assert latest_checkpoint(checkpoint_root(cfg_b.out)).name == "step-000000010"
    resumed = train(cfg_b, source=InMemoryActivations(x, y), resume=True)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), n
    from cltrace.training.metrics import read_metrics

    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert sum(r["resampled"] for r in a) > 0  # resampling did happen in this run


def test_resampling_revives_dead_features_in_training(tmp_path, device):
    """Same run with and without resampling: more features fire on the training rows at the end with it."""
    x, y = synthetic(2048, device=device)
    kw = dict(activation="batchtopk", k=2, device=device, tokens=64 * 80, dead_tokens=256, checkpoint_every=0,
              features_per_layer=64, auxk=0.0)
    off = train(cfg_for(tmp_path, "off", **kw), source=InMemoryActivations(x, y))
    on = train(cfg_for(tmp_path, "on", resample_every=5, **kw), source=InMemoryActivations(x, y))

    def alive(tc):
        acts, _ = tc(x[:1024])
        return int((acts != 0).any(0).sum())

    assert alive(on) > alive(off), (alive(on), alive(off))


def test_resampling_is_refused_under_torchrun(tmp_path):
    from cltrace.errors import SettingError

    class FakeDist:
        distributed = True

        def source_is_share(self, src):
            return False

    x, y = synthetic(256)
    with pytest.raises(SettingError, match="one process"):
        Trainer(cfg_for(tmp_path, resample_every=5), InMemoryActivations(x, y), dist=FakeDist())
