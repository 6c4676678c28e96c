"""The passes over corpora and prompt sets on several processes (gloo, CPU) equal one process exactly.

Two launches of spawned workers (the launcher of tests/test_distributed.py) run every pass: one process
(the reference, then a resume of the two-process run's interrupted build), and two processes (the feature
database with a merge at every batch, an interrupted build, validation, `cltrace trace --prompts`). Both
use one thread per process, so activations are computed the same way. The corpus repeats contexts so that
the top-k has exact ties across the two shares, with the later copy on rank 0 (which merges first).
"""

from __future__ import annotations

import json
import math
import random
import sqlite3

import numpy as np
import pytest
import torch
from test_distributed import launch

from cltrace.features import FeatureStats, build_features
from cltrace.features.build import partial_dir
from cltrace.features.db import database_contents
from cltrace.features.stats import SUM_LIMBS, exact_add, exact_value, normalize_limbs, occurrence_keys, splitmix64

T, BATCH = 24, 2
TEXT = ("Fact: Michael Jordan plays the sport of basketball. The opposite of hot is cold, and the capital of "
        "France is Paris. Numbers: 36+59=95, 12*3=36. def f(x): return x + 1. The National Digital Analytics "
        "Group (NDAG) met on Monday.")
VALIDATE_TEXTS = ["the cat sat", "one two", "a b c d"]
TRACE_PROMPTS = ["Fact: Michael", "the cat", "one two three", "a b", "hot is"]


def documents() -> list[str]:
    """12 one-context documents in 6 batches of 2: batches 0, 2, 4 go to rank 0, batches 1, 3, 5 to rank 1.
    Context 4 (rank 0) repeats context 2 (rank 1): a tie the checkpoint merge after batch 3 decides; context
    8 (rank 0, after that merge) repeats context 3: a tie the pass decides against merged statistics."""
    n = T - 3
    p = [TEXT[i:i + n] for i in range(0, 10 * n, n)]
    return [p[0], p[1], p[2], p[3], p[2], p[4], p[5], p[6], p[3], p[7], p[8], p[9]]


BUILD = dict(corpus=documents(), n_tokens=12 * T, context_len=T, batch_size=BATCH, top_k=5, window=(4, 2),
             n_ranges=4, per_range=2, coactivation=1000, coact_tokens=20, progress=False, log=lambda msg: None)


def tiny_clt():
    from cltrace.models.tiny import tiny_model
    from cltrace.replacement.calibrate import random_transcoder

    model = tiny_model("llama")
    return model, random_transcoder(model, "clt", n_features=32, active_per_layer=60, seed=0)


def worker_passes(rank: int, tmp: str, model_dir: str) -> dict:
    """Every pass, on this launch's processes (world 1: the references; world 2: the split runs)."""
    from pathlib import Path

    from cltrace.cli import main
    from cltrace.training.distributed import init_distributed
    from cltrace.validation import Settings, validate

    d = init_distributed()
    tmp = Path(tmp)
    tag = f"w{d.world}"
    model, clt = tiny_clt()
    build_features(model, clt, out=tmp / f"{tag}.db", dist=d, checkpoint_every=4, **BUILD)  # merges: 2
    if d.world == 2:  # rank 1 asks to stop after the second batch: both ranks stop, rank 0 saves the merge

        def stop(batches: int) -> None:
            if rank == 1 and batches == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build_features(model, clt, out=tmp / "resumed.db", dist=d, checkpoint_every=0, on_batch=stop, **BUILD)
    else:  # one process resumes the two processes' checkpoint
        build_features(model, clt, out=tmp / "resumed.db", resume=True, **BUILD)
    vclt = random_transcoder_for_validation(model)
    validate(model, vclt, VALIDATE_TEXTS, out=tmp / f"val-{tag}", progress=False, dist=d,
             settings=Settings(max_features=None, sources=2, targets=4, seed=3))
    rc = main(["-q", "trace", "--prompts", str(tmp / "prompts.txt"), "-m", model_dir, "--random-transcoders", "48",
               "--random-active", "10", "--out-dir", str(tmp / f"graphs-{tag}")])  # last: it ends the group
    return {"rc": rc}


def random_transcoder_for_validation(model):
    from cltrace.replacement.calibrate import random_transcoder

    return random_transcoder(model, "clt", n_features=24, active_per_layer=14, prompt=VALIDATE_TEXTS[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from cltrace.models.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("passes")
    (tmp / "prompts.txt").write_text("\n".join(TRACE_PROMPTS) + "\n")
    model_dir = str(save_tiny("llama", tmp / "tiny"))
    two = launch(worker_passes, 2, tmp / "launch2", str(tmp), model_dir, timeout=900)
    assert not partial_dir(tmp / "w2.db").exists() and (partial_dir(tmp / "resumed.db") / "state.safetensors").exists()
    progress = json.loads((partial_dir(tmp / "resumed.db") / "progress.json").read_text())
    assert progress["n_contexts"] == 2 * BATCH  # stopped after the second batch, on both ranks
    one = launch(worker_passes, 1, tmp / "launch1", str(tmp), model_dir, timeout=900)
    assert [r["rc"] for r in two + one] == [0, 0, 0]
    return tmp


# ---------------------------------------------------------------------- the feature database
COACT_TABLES = ("coactivation", "coactivation_sources")


def assert_same_database(path, ref) -> None:
    """Every table, every example (top-k windows, quantile examples) and the meta equal; co-activation sums to
    float64 summation order (each source has fewer than M partners: the exact regime)."""
    one, two = database_contents(ref), database_contents(path)
    assert set(one) == set(two)
    for name in sorted(set(one) - set(COACT_TABLES)):
        assert one[name] == two[name], name
    assert len(one["examples"]) > 100 and len(one["coactivation"]) > 100
    for name in COACT_TABLES:
        assert len(one[name]) == len(two[name])
        for a, b in zip(one[name], two[name]):
            assert a[:4 if name == "coactivation" else 2] == b[:4 if name == "coactivation" else 2], name
            assert a[-2:] == pytest.approx(b[-2:], rel=1e-12, abs=0), name


def test_features_two_processes_write_the_one_process_database(runs):
    assert_same_database(runs / "w2.db", runs / "w1.db")
    with sqlite3.connect(runs / "w1.db") as c:  # the corpus does tie across the shares, in the top-k
        for earlier, later in ((2, 4), (3, 8)):
            ties = c.execute("SELECT COUNT(*) FROM examples a JOIN examples b ON a.layer = b.layer AND a.feature = "
                             "b.feature AND a.kind = 'top' AND b.kind = 'top' AND a.value = b.value AND a.pos = "
                             "b.pos AND a.context_id = ? AND b.context_id = ?", (earlier, later)).fetchone()[0]
            assert ties > 0, (earlier, later)


def test_interrupted_two_process_build_resumes_on_one_process(runs):
    assert_same_database(runs / "resumed.db", runs / "w1.db")


# ---------------------------------------------------------------------- validation and trace --prompts
def _without_seconds(x):
    """x without timings (and what depends on them: a graph file's size, as its meta holds its seconds)."""
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if k not in ("seconds", "command", "file_bytes")}
    if isinstance(x, list):
        return [_without_seconds(v) for v in x]
    return x


def test_validate_two_processes_equals_one(runs):
    one, two = runs / "val-w1", runs / "val-w2"
    files = sorted(p.relative_to(one) for p in (one / "clt" / "prompts").glob("*.json"))
    assert len(files) == len(VALIDATE_TEXTS)
    assert files == sorted(p.relative_to(two) for p in (two / "clt" / "prompts").glob("*.json"))
    for f in files:
        r1, r2 = (json.loads((d / f).read_text()) for d in (one, two))
        assert _without_seconds(r1) == _without_seconds(r2)
    v1, v2 = (json.loads((d / "validation.json").read_text()) for d in (one, two))
    assert _without_seconds(v1) == _without_seconds(v2)
    assert v1["summaries"]["clt"]["n_prompts"] == len(VALIDATE_TEXTS)


def test_trace_prompts_two_processes_equals_one(runs):
    from cltrace.attribution import Graph

    i1, i2 = (json.loads((runs / d / "index.json").read_text()) for d in ("graphs-w1", "graphs-w2"))
    assert [e["prompt"] for e in i1["graphs"]] == TRACE_PROMPTS
    assert _without_seconds(i1) == _without_seconds(i2)
    for e in i1["graphs"]:
        g1, g2 = Graph.load(runs / "graphs-w1" / e["file"]), Graph.load(runs / "graphs-w2" / e["file"])
        assert g1.tokens == g2.tokens and g1.n_nodes == e["n_nodes"] > 0
        assert torch.equal(g1.edges, g2.edges) and torch.equal(g1.features, g2.features)
        assert torch.equal(g1.activations, g2.activations)
        assert _without_seconds(g1.meta) == _without_seconds(g2.meta)


# ---------------------------------------------------------------------- the merge itself, in one process
def random_shares(seed: int, L=2, F=7, B=3, Tn=10, n_batches=12):
    """Activations on a coarse grid (many exact ties) for n_batches batches of B contexts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        a = torch.randint(1, 6, (L, B, Tn, F), generator=g).float() / 2
        a *= torch.rand(L, B, Tn, F, generator=g) < 0.4
        a[:, :, 0] = 0.0
        out.append(a)
    return out


def fill(stats: FeatureStats, batches, which, B: int, Tn: int) -> FeatureStats:
    for i in which:
        for layer in range(batches[i].shape[0]):
            stats.update_layer(layer, batches[i][layer], i * B)
        stats.contexts.append(torch.zeros(B, Tn, dtype=torch.int32) + i)
        stats.context_index.append(torch.arange(i * B, (i + 1) * B))
        stats.n_contexts += B
    return stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_any_split_equals_one_pass(seed):
    """Batches dealt to three shares at random (so the earlier copy of a tie is as often in a later share),
    merged in a random order: every tensor of the state equals one pass over all batches in order. The
    reservoir (2 per bin) and the top-k (3) overflow, so the tie rules and the key order decide."""
    L, F, B, Tn = 2, 7, 3, 10
    batches = random_shares(seed)
    kw = dict(top_k=3, window=(2, 1), per_bin=2, seed=seed)
    one = fill(FeatureStats(L, F, Tn, **kw), batches, range(len(batches)), B, Tn)
    rnd = random.Random(seed)
    owner = [rnd.randrange(3) for _ in batches]
    shares = [fill(FeatureStats(L, F, Tn, **kw), batches, [i for i in range(len(batches)) if owner[i] == s], B, Tn)
              for s in range(3)]
    rnd.shuffle(shares)
    merged = shares[0].merge(shares[1]).merge(shares[2])
    a, b = one.state_dict(), merged.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].nan_to_num(), b[name].nan_to_num()), name
        assert torch.equal(a[name].isnan(), b[name].isnan()), name
    assert int((one.top_gidx >= 0).sum()) > 0 and int((one.q_gidx >= 0).sum()) > 0
    with pytest.raises(ValueError, match="share contexts"):
        merged.merge(fill(FeatureStats(L, F, Tn, **kw), batches, [0], B, Tn))


def test_exact_sums_do_not_depend_on_the_order():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, 5, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-9, 6, (200, 5),
                                                                                      generator=g)).double()
    fwd = torch.zeros(5, SUM_LIMBS, dtype=torch.int64)
    for row in x:
        exact_add(fwd, row)
    halves = [torch.zeros(5, SUM_LIMBS, dtype=torch.int64) for _ in range(2)]
    for i in torch.randperm(200, generator=g).tolist():
        exact_add(halves[i % 2], x[i])
    assert torch.equal(normalize_limbs(halves[0] + halves[1]), fwd)
    want = [math.fsum(x[:, j].tolist()) for j in range(5)]  # the correctly rounded sum
    assert exact_value(fwd).tolist() == pytest.approx(want, rel=1e-15)


def splitmix_reference(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_reservoir_keys_are_splitmix64_of_seed_feature_and_token():
    """The keys equal a pure-Python SplitMix64 (so int64 wrap-around and the logical shifts are right) and are
    uniform (a crude check: mean and a quartile)."""
    seed, layer, F = 7, 3, 1000
    feat, gidx = torch.randint(0, F, (4000,)), torch.randint(0, 1 << 40, (4000,))
    got = occurrence_keys(seed, layer, F, feat, gidx)
    base = splitmix_reference(seed)
    for f, t, k in list(zip(feat.tolist(), gidx.tolist(), got.tolist()))[:200]:
        h = splitmix_reference(splitmix_reference(base ^ (layer * F + f)) ^ t)
        assert k == (h >> 11) * 2.0 ** -53
    assert splitmix64(torch.tensor([0, -1])).tolist() == [v - (1 << 64) if v >= 1 << 63 else v
                                                          for v in map(splitmix_reference, [0, (1 << 64) - 1])]
    assert abs(float(got.mean()) - 0.5) < 0.02 and abs(float((got < 0.25).double().mean()) - 0.25) < 0.03
    assert np.unique(got.numpy()).size == got.numel()
