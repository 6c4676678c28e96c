"""Transcoders read from disk on demand (`load_transcoder(lazy=True)`) compute exactly what eager ones compute,
read only the encoder layers and decoder rows they use, and fail with one line when their files change."""

import json
import os

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.errors import CltraceError
from cltrace.features.stats import FeatureStats
from cltrace.interventions import intervene
from cltrace.models.tiny import tiny_model
from cltrace.replacement import build_replacement, random_transcoder
from cltrace.training.checkpoint import save_checkpoint
from cltrace.transcoders.circuit_tracer_format import export_circuit_tracer
from cltrace.transcoders.io import load_transcoder, save_transcoder
from cltrace.transcoders.sharded import save_shard, shard_bounds, shard_config

PROMPT = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _random(model, kind="clt", skip=False, n_features=96, seed=0):
    return random_transcoder(model, kind, n_features, 12, seed=seed, prompt=PROMPT, skip=skip)


def _write(tc, fmt: str, folder):
    """tc written in format fmt -> the folder to load (the eager load of it is the reference)."""
    if fmt == "cltrace":
        return save_transcoder(tc, folder)
    if fmt == "sharded":
        n = 3
        for j in range(n):
            lo, hi = shard_bounds(tc.n_features, n)[j]
            part = type(tc)(shard_config(tc.cfg, j, n), init=False)
            state = {"W_enc": tc.W_enc[..., lo:hi], "b_enc": tc.b_enc[:, lo:hi],
                     "log_threshold": tc.log_threshold[:, lo:hi], "b_dec": tc.b_dec,
                     **{f"W_dec.{s}": w[lo:hi] for s, w in enumerate(tc.W_dec)}}
            if tc.W_skip is not None:
                state["W_skip"] = tc.W_skip
            part.load_state_dict(state)
            save_shard(part, folder)
        return folder
    if fmt == "checkpoint":  # normalization scalars that are not 1, so the fold matters
        g = torch.Generator().manual_seed(1)
        L = tc.n_layers
        tensors = {f"tc.{k}": v for k, v in tc.state_dict().items()}
        tensors["norm.x_scale"] = torch.rand(L, generator=g) + 0.5
        tensors["norm.y_scale"] = torch.rand(L, generator=g) + 0.5
        meta = {"config": {"kind": tc.cfg.kind, "activation": "jumprelu", "features_per_layer": tc.n_features},
                "model_name": tc.cfg.model_name}
        return save_checkpoint(folder / "checkpoints", 7, tensors, meta)
    if fmt == "circuit-tracer":
        return export_circuit_tracer(tc, folder)
    raise ValueError(fmt)


CASES = [("cltrace", "clt", False), ("cltrace", "plt", True), ("sharded", "clt", False), ("checkpoint", "clt", False),
         ("checkpoint", "plt", True), ("circuit-tracer", "clt", False), ("circuit-tracer", "plt", True)]


@pytest.mark.parametrize("fmt,kind,skip", CASES)
def test_lazy_attribution_is_bit_identical(llama, tmp_path, fmt, kind, skip):
    folder = _write(_random(llama, kind, skip), fmt, tmp_path / "tc")
    eager, lazy = load_transcoder(folder, lazy=False), load_transcoder(folder, lazy=True)
    assert lazy.lazy and not eager.lazy and lazy.W_enc.is_meta
    ids = llama.tokenize(PROMPT)
    ge, gl = attribute(llama, eager, ids, batch_size=16), attribute(llama, lazy, ids, batch_size=16)
    assert ge.n_features > 10  # the comparison covers features, errors and tokens
    for name in ("edges", "features", "activations", "row_constant", "row_value", "rows"):
        assert torch.equal(getattr(ge, name), getattr(gl, name)), name
    assert ge.meta["max_logit_error"] == gl.meta["max_logit_error"]


def test_lazy_long_prompt_path_is_bit_identical(llama, tmp_path, monkeypatch):
    """The path for many (layer, position) groups, where decoder rows are gathered per chunk of features."""
    from cltrace.attribution import engine

    orig = engine.RowComputer._build_groups
    monkeypatch.setattr(engine.RowComputer, "_build_groups", lambda self: orig(self, max_groups=0))
    folder = save_transcoder(_random(llama), tmp_path / "tc")
    ids = llama.tokenize(PROMPT)
    ge = attribute(llama, load_transcoder(folder, lazy=False), ids, batch_size=16, max_feature_nodes=30)
    gl = attribute(llama, load_transcoder(folder, lazy=True), ids, batch_size=16, max_feature_nodes=30)
    assert torch.equal(ge.edges, gl.edges) and torch.equal(ge.features, gl.features)


def test_lazy_reads_only_active_rows_and_each_encoder_layer(llama, tmp_path):
    """Decoder bytes read are those of the distinct active features' rows (at most a few reads each), far
    below the decoder's size; the encoder is read layer by layer, a few passes in all."""
    tc = _random(llama, n_features=2048)
    folder = save_transcoder(tc, tmp_path / "tc")
    lazy = load_transcoder(folder, lazy=True)
    ids = llama.tokenize(PROMPT)
    g = attribute(llama, lazy, ids, batch_size=16)
    feats = build_replacement(llama, load_transcoder(folder, lazy=False), ids).features
    L, D = tc.n_layers, tc.d_model
    active = sum(feats.index[feats.layer == s].unique().numel() * tc.n_out(s) * D * 4 for s in range(L))
    total_dec = sum(tc.n_out(s) * tc.n_features * D * 4 for s in range(L))
    assert active > 0 and g.n_features == len(feats)
    assert active <= lazy.store.decoder_bytes <= 4 * active < total_dec / 10
    enc_layer = D * tc.n_features * 4
    assert lazy.store.encoder_bytes % enc_layer == 0 and lazy.store.encoder_bytes <= 4 * L * enc_layer


def test_lazy_interventions_and_feature_stats_are_identical(llama, tmp_path):
    folder = save_transcoder(_random(llama, skip=True), tmp_path / "tc")
    eager, lazy = load_transcoder(folder, lazy=False), load_transcoder(folder, lazy=True)
    feats = build_replacement(llama, eager, llama.tokenize(PROMPT)).features
    layer, pos, f = (int(t) for t in (feats.layer[3], feats.pos[3], feats.index[3]))
    for mode in ("constrained", "free"):
        ivs = [{"layer": layer, "feature": f, "pos": pos, "value": 0.0},
               {"layer": 0, "feature": 5, "value": 3.0, "op": "scale"}]
        re, rl = (intervene(llama, t, PROMPT, ivs, mode=mode) for t in (eager, lazy))
        assert json.dumps(re.to_dict()) == json.dumps(rl.to_dict())
        noop = intervene(llama, eager, PROMPT, [{"layer": 0, "feature": 5, "value": 1.0, "op": "scale"}], mode=mode)
        assert re.logits_after != noop.logits_after  # the interventions change what is compared
    ids = torch.stack([llama.tokenize("a b c d e f g h")[:8], llama.tokenize(PROMPT)[:8]])
    stats = []
    for t in (eager, lazy):
        st = FeatureStats(t.n_layers, t.n_features, ids.shape[1], top_k=4)
        st.add_batch(llama, t, ids)
        stats.append(st.state_dict())
    assert stats[0].keys() == stats[1].keys()
    assert any(v.abs().sum() > 0 for v in stats[0].values() if v.is_floating_point())
    for k in stats[0]:
        torch.testing.assert_close(stats[0][k], stats[1][k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize("fmt", ["cltrace", "circuit-tracer", "sharded"])
@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_file_changed_under_a_lazy_transcoder_fails_clearly(llama, tmp_path, fmt, change):
    folder = _write(_random(llama), fmt, tmp_path / "tc")
    lazy = load_transcoder(folder, lazy=True)
    x = torch.randn(3, llama.d_model)
    lazy.pre_acts(x, 1)  # reads fine
    victim = lazy.store.files[-1].path
    if change == "truncate":
        os.truncate(victim, victim.stat().st_size - 100)
    else:  # same size, other bytes (a re-export in place)
        data = bytearray(victim.read_bytes())
        data[-8:] = bytes(8)
        victim.write_bytes(bytes(data))
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: the write must show
    with pytest.raises(CltraceError, match="modified or truncated") as e:
        lazy.pre_acts(x, 1)
        lazy.decoder_vectors(lazy.n_layers - 1, torch.arange(3))
    assert "\n" not in str(e.value)


def test_corrupt_files_fail_at_open(llama, tmp_path):
    folder = save_transcoder(_random(llama), tmp_path / "tc")
    w = folder / "transcoder.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 1000])  # truncated: the header's offsets run past the end
    with pytest.raises(CltraceError, match="corrupt: tensor .* does not fit"):
        load_transcoder(folder, lazy=True)
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(CltraceError, match="header"):
        load_transcoder(folder, lazy=True)
    w.write_bytes(data)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_features": cfg["n_features"] + 1}))
    with pytest.raises(CltraceError, match="shape"):
        load_transcoder(folder, lazy=True)


def test_lazy_refuses_training(llama, tmp_path):
    lazy = load_transcoder(save_transcoder(_random(llama), tmp_path / "tc"), lazy=True)
    with pytest.raises(CltraceError, match="lazy=False"):
        lazy.fold_normalization(torch.ones(lazy.n_layers), torch.ones(lazy.n_layers))


def test_lazy_feature_database_equals_eager(llama, tmp_path):
    """The whole `build_features` (statistics, input and output effects, the database) of a transcoder kept on
    disk writes the same tables as the same file loaded eagerly."""
    import sqlite3

    from cltrace.features import build_features
    from cltrace.features.db import transcoder_fingerprint

    folder = save_transcoder(_random(llama, "clt", n_features=32), tmp_path / "tc")
    text = "Fact: Michael Jordan plays the sport of basketball. The capital of France is Paris. " * 4
    build = dict(corpus=[text[i:i + 21] for i in range(0, 210, 21)], n_tokens=10 * 24, context_len=24,
                 batch_size=4, top_k=4, window=(4, 2), n_ranges=2, per_range=2, progress=False, log=lambda m: None)
    dumps = []
    for lazy in (False, True):
        tc = load_transcoder(folder, lazy=lazy)
        assert tc.lazy == lazy
        out = tmp_path / f"lazy{lazy}.db"
        build_features(llama, tc, out=out, **build)
        with sqlite3.connect(out) as c:
            names = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            dumps.append({n: c.execute(f"SELECT * FROM {n}").fetchall() for n in names if n != "meta"})
    assert dumps[0].keys() == dumps[1].keys() and len(dumps[0]) > 2
    fingerprints = {transcoder_fingerprint(load_transcoder(folder, lazy=lazy)) for lazy in (False, True)}
    assert len(fingerprints) == 1  # a database built from one opens with the other
    for name in dumps[0]:
        assert dumps[0][name] == dumps[1][name], name
