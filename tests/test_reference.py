"""The custom autograd functions and the memory-order AdamW against plain PyTorch written out here.

Every reference below is built from dense tensors, plain matmuls / indexing and PyTorch's own autograd (or, for
the straight-through estimators, the documented pseudo-derivative written out by hand), never from the code
under test. Values and gradients are compared on fresh random inputs: each test runs on two fixed seeds and one
drawn per run from os.urandom; a failure prints the seed, and `CLTRACE_TEST_SEED=<seed>` replays it.
Tensors are tiny (a CPU with 2 shared cores runs the file in a few seconds).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from cltrace.training.optim import AdamW
from cltrace.transcoders import sparse as sp
from cltrace.transcoders.activations import batch_topk, batch_topk_cutoff, batch_topk_mask, jumprelu, step, topk
from cltrace.transcoders.sparse import Listing, _ListedPreActs, _PlaceOnLayers, _TiledSparseDecode

_RUN_SEED = int(os.environ.get("CLTRACE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


@pytest.fixture(params=[0, 1, "random"], ids=["seed0", "seed1", "random_seed"])
def seed(request) -> int:
    return _RUN_SEED if request.param == "random" else request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def why(seed: int, what: str) -> str:
    return f"{what} [seed={seed}; replay with CLTRACE_TEST_SEED={seed}]"


def close(actual, expected, seed: int, what: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{why(seed, what)}\n{m}")


def check_grad(fn, inputs, seed: int, what: str) -> None:
    """torch.autograd.gradcheck (float64 inputs): analytic backward against central finite differences."""
    try:
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    except torch.autograd.gradcheck.GradcheckError as e:
        raise AssertionError(f"{why(seed, what)}\n{e}") from e


# ====================================================================== sparse decode: inputs and references
def make_mask(g: torch.Generator, N: int, L: int, Fn: int, density: float = 0.3) -> torch.Tensor:
    """A random [N, L, F] listing mask with a source layer that lists nothing (layer 1), a token that lists
    nothing anywhere (token 0), and a token that lists nothing in layer 0 only (token N-1)."""
    mask = torch.rand(N, L, Fn, generator=g) < density
    mask[:, 1] = False
    mask[0] = False
    mask[N - 1, 0] = False
    mask[N - 1, 2:, : Fn // 2] = True  # and at least something in the other layers
    mask[1, 0, 0] = True
    return mask


def make_vals(g: torch.Generator, nnz: int, dtype=torch.float32) -> torch.Tensor:
    """Listed values, a quarter of them exactly zero (JumpReLU lists features inside the kernel window with
    activation 0: they must still get their exact gradient)."""
    vals = torch.randn(nnz, generator=g, dtype=dtype)
    return torch.where(torch.rand(nnz, generator=g) < 0.25, torch.zeros((), dtype=dtype), vals)


def make_W_dec(g: torch.Generator, kind: str, layout: str, L: int, Fn: int, D: int, dtype=torch.float32):
    """W_dec[s] [F, n_out(s), D]; n_out = L - s (CLT) or 1 (PLT); target-major = created as
    torch.empty(n_out, F, D).transpose(0, 1) like the Transcoder's, or plainly contiguous."""
    Ws = []
    for s in range(L):
        n_out = L - s if kind == "clt" else 1
        data = torch.randn(n_out, Fn, D, generator=g, dtype=dtype) / Fn**0.5
        W = data.transpose(0, 1) if layout == "target_major" else data.transpose(0, 1).contiguous()
        assert W.shape == (Fn, n_out, D)
        if layout == "target_major" and n_out > 1:
            assert not W.is_contiguous() and W[:, 0].is_contiguous()  # the layout this case is about
        Ws.append(W.requires_grad_())
    return Ws


def dense_acts(listing: Listing, vals: torch.Tensor, N: int, L: int, Fn: int) -> torch.Tensor:
    """vals [nnz] -> dense [N, L, F] activations, differentiable in vals (plain index_put)."""
    return torch.zeros(N, L, Fn, dtype=vals.dtype).index_put((listing.rows, listing.lay, listing.feats), vals)


def ref_decode(acts: torch.Tensor, W_dec) -> torch.Tensor:
    """out[:, t] = Σ_{s ≤ t, t - s < n_out(s)} acts[:, s] @ W_dec[s][:, t - s]: plain matmuls, plain autograd."""
    L = acts.shape[1]
    outs = []
    for t in range(L):
        terms = [acts[:, s] @ W_dec[s][:, t - s] for s in range(t + 1) if t - s < W_dec[s].shape[1]]
        outs.append(torch.stack(terms).sum(0))
    return torch.stack(outs, 1)


def upstream(g: torch.Generator, N: int, L: int, D: int, layout: str, dtype=torch.float32) -> torch.Tensor:
    """An output gradient [N, L, D], token-major (contiguous) or layer-major (a transposed [L, N, D])."""
    if layout == "layer_major":
        return torch.randn(L, N, D, generator=g, dtype=dtype).transpose(0, 1)
    return torch.randn(N, L, D, generator=g, dtype=dtype)


# ====================================================================== Listing
def test_listing_of_matches_an_explicit_enumeration(seed):
    g = gen(seed)
    N, L, Fn = 6, 4, 7
    mask = make_mask(g, N, L, Fn)
    lst = Listing.of(mask)
    expected = [(l, n, f) for l in range(L) for n in range(N) for f in range(Fn) if mask[n, l, f]]
    got = list(zip(lst.lay.tolist(), lst.rows.tolist(), lst.feats.tolist()))
    assert got == expected, why(seed, "Listing.of order: by layer, then token, then feature")
    assert lst.per_layer == [sum(1 for e in expected if e[0] == l) for l in range(L)], why(seed, "per_layer")
    assert lst.per_layer[1] == 0 and lst.n_tokens == N, why(seed, "empty layer / n_tokens")
    for l, (r, f) in enumerate(zip(lst.by_layer(lst.rows), lst.by_layer(lst.feats))):
        want = [(n, ff) for (ll, n, ff) in expected if ll == l]
        assert list(zip(r.tolist(), f.tolist())) == want, why(seed, "by_layer")

    # gather / scatter against explicit loops, in both memory layouts of the dense tensor
    t = torch.randn(N, L, Fn, generator=g)
    for like in (t, t.transpose(0, 1).contiguous().transpose(0, 1)):
        gathered = lst.gather(like)
        assert gathered.tolist() == [like[n, l, f].item() for (l, n, f) in expected], why(seed, "gather")
        vals = torch.randn(len(expected), generator=g)
        dense = lst.scatter(vals, like)
        ref = torch.zeros(N, L, Fn)
        for v, (l, n, f) in zip(vals.tolist(), expected):
            ref[n, l, f] = v
        assert dense.shape == like.shape and torch.equal(dense, ref), why(seed, "scatter")

    # by_feature: each layer's entries grouped by feature (stable: tokens ascending within a feature)
    for l in range(L):
        order, rows_f, offsets = lst.by_feature(l, Fn)
        rows_l, feats_l = lst.by_layer(lst.rows)[l], lst.by_layer(lst.feats)[l]
        assert torch.equal(rows_l[order], rows_f), why(seed, "by_feature rows")
        for f in range(Fn):
            end = offsets[f + 1].item() if f + 1 < Fn else len(rows_f)
            toks = [n for n in range(N) if mask[n, l, f]]
            assert rows_f[offsets[f].item() : end].tolist() == toks, why(seed, f"by_feature layer {l} feature {f}")
            assert (feats_l[order][offsets[f].item() : end] == f).all(), why(seed, "by_feature feats")


# ====================================================================== _PlaceOnLayers / decode_dense
@pytest.mark.parametrize("widths", ["clt", "plt", "mixed"])
def test_place_on_layers_value_gradient_gradcheck(seed, widths):
    g = gen(seed)
    N, L, D = 5, 4, 3
    ns = {"clt": [L - s for s in range(L)], "plt": [1] * L, "mixed": [2, 1, 2, 1]}[widths]

    def ref(*contribs):
        out = []
        for t in range(L):
            terms = [c.view(N, n, D)[:, t - s] for s, (c, n) in enumerate(zip(contribs, ns)) if s <= t < s + n]
            out.append(torch.stack(terms).sum(0))
        return torch.stack(out, 1)

    contribs = [torch.randn(N, n * D, generator=g, requires_grad=True) for n in ns]
    out = _PlaceOnLayers.apply(L, D, *contribs)
    expected = ref(*contribs)
    close(out, expected, seed, "_PlaceOnLayers value", rtol=0, atol=1e-6)
    for layout in ("token_major", "layer_major"):
        G = upstream(g, N, L, D, layout)
        got = torch.autograd.grad(out, contribs, G, retain_graph=True)
        want = torch.autograd.grad(expected, contribs, G, retain_graph=True)
        for s, (a, b) in enumerate(zip(got, want)):
            close(a, b, seed, f"_PlaceOnLayers d contrib[{s}] ({layout} upstream)", rtol=0, atol=1e-6)

    c64 = [c.detach().double().requires_grad_() for c in contribs]
    check_grad(lambda *c: _PlaceOnLayers.apply(L, D, *c), tuple(c64), seed, "_PlaceOnLayers gradcheck")


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("layout", ["target_major", "contiguous"])
def test_decode_dense_value_gradient(seed, kind, layout):
    g = gen(seed)
    N, L, Fn, D = 6, 4, 8, 5
    W = make_W_dec(g, kind, layout, L, Fn, D)
    acts = (torch.randn(N, L, Fn, generator=g) * (torch.rand(N, L, Fn, generator=g) < 0.4)).requires_grad_()
    out = sp.decode_dense(W, acts, D)
    expected = ref_decode(acts, W)
    close(out, expected, seed, "decode_dense value")
    G = upstream(g, N, L, D, "layer_major")
    got = torch.autograd.grad(out, [acts, *W], G)
    want = torch.autograd.grad(expected, [acts, *W], G)
    for i, (a, b) in enumerate(zip(got, want)):
        close(a, b, seed, "decode_dense d acts" if i == 0 else f"decode_dense d W_dec[{i - 1}]")

    g64 = gen(seed)
    W64 = make_W_dec(g64, kind, layout, 3, 4, 3, torch.float64)
    acts64 = torch.randn(3, 3, 4, generator=g64, dtype=torch.float64, requires_grad=True)
    check_grad(lambda a, *w: sp.decode_dense(w, a, 3), (acts64, *W64), seed, "decode_dense gradcheck")


# ====================================================================== _TiledSparseDecode / decode_listed
@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("layout", ["target_major", "contiguous"])
@pytest.mark.parametrize("api", ["apply", "decode_listed"])
def test_tiled_sparse_decode_value_gradient(seed, kind, layout, api):
    g = gen(seed)
    N, L, Fn, D = 7, 4, 9, 5
    mask = make_mask(g, N, L, Fn)
    lst = Listing.of(mask)
    vals = make_vals(g, len(lst.rows)).requires_grad_()
    W = make_W_dec(g, kind, layout, L, Fn, D)
    out = _TiledSparseDecode.apply(lst, vals, *W) if api == "apply" else sp.decode_listed(W, lst, vals)
    expected = ref_decode(dense_acts(lst, vals, N, L, Fn), W)
    assert out.shape == (N, L, D), why(seed, "shape")
    close(out, expected, seed, f"{api} value")
    assert torch.equal(out[0], torch.zeros(L, D)), why(seed, "a token that lists nothing decodes to exactly 0")
    for glayout in ("token_major", "layer_major"):
        G = upstream(g, N, L, D, glayout)
        got = torch.autograd.grad(out, [vals, *W], G, retain_graph=True)
        want = torch.autograd.grad(expected, [vals, *W], G, retain_graph=True)
        close(got[0], want[0], seed, f"{api} d vals ({glayout} upstream)")
        for s in range(L):
            close(got[1 + s], want[1 + s], seed, f"{api} d W_dec[{s}] ({glayout} upstream)")
        assert torch.equal(got[2], torch.zeros_like(W[1])), why(seed, "empty source layer: d W_dec[1] is 0")


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("layout", ["target_major", "contiguous"])
def test_tiled_sparse_decode_gradcheck(seed, kind, layout):
    g = gen(seed)
    N, L, Fn, D = 5, 3, 6, 3
    lst = Listing.of(make_mask(g, N, L, Fn, density=0.35))
    vals = make_vals(g, len(lst.rows), torch.float64).requires_grad_()
    W = make_W_dec(g, kind, layout, L, Fn, D, torch.float64)
    check_grad(lambda v, *w: _TiledSparseDecode.apply(lst, v, *w), (vals, *W), seed, "_TiledSparseDecode gradcheck")


def test_tiled_sparse_decode_partial_requires_grad(seed):
    """Only vals, or only the decoders, require a gradient (attribution / a frozen decoder)."""
    g = gen(seed)
    N, L, Fn, D = 6, 3, 7, 4
    lst = Listing.of(make_mask(g, N, L, Fn))
    vals0 = make_vals(g, len(lst.rows))
    W0 = [w.detach() for w in make_W_dec(g, "clt", "target_major", L, Fn, D)]
    G = torch.randn(N, L, D, generator=g)
    # vals only
    vals = vals0.clone().requires_grad_()
    got = torch.autograd.grad(_TiledSparseDecode.apply(lst, vals, *W0), vals, G)[0]
    want = torch.autograd.grad(ref_decode(dense_acts(lst, vals, N, L, Fn), W0), vals, G)[0]
    close(got, want, seed, "d vals with frozen decoders")
    # decoders only
    W = [w.clone().requires_grad_() for w in W0]
    got = torch.autograd.grad(_TiledSparseDecode.apply(lst, vals0, *W), W, G)
    want = torch.autograd.grad(ref_decode(dense_acts(lst, vals0, N, L, Fn), W), W, G)
    for s in range(L):
        close(got[s], want[s], seed, f"d W_dec[{s}] with constant vals")


def test_tiled_sparse_decode_empty_listing(seed):
    g = gen(seed)
    N, L, Fn, D = 4, 3, 5, 2
    lst = Listing.of(torch.zeros(N, L, Fn, dtype=torch.bool))
    vals = torch.zeros(0, requires_grad=True)
    W = make_W_dec(g, "clt", "target_major", L, Fn, D)
    out = _TiledSparseDecode.apply(lst, vals, *W)
    assert torch.equal(out, torch.zeros(N, L, D)), why(seed, "nothing listed decodes to 0")
    grads = torch.autograd.grad(out, [vals, *W], torch.randn(N, L, D, generator=g))
    assert grads[0].shape == (0,), why(seed, "d vals of an empty listing")
    for s in range(L):
        assert torch.equal(grads[1 + s], torch.zeros_like(W[s])), why(seed, f"d W_dec[{s}] of an empty listing")


# ====================================================================== decode_rows
@pytest.mark.parametrize("layout", ["target_major", "contiguous"])
def test_decode_rows_value_gradient(seed, layout):
    g = gen(seed)
    N, Fn, n_out, D = 6, 9, 3, 4
    W = make_W_dec(g, "clt", layout, n_out, Fn, D)[0]  # [F, n_out, D]
    a = torch.randn(N, Fn, generator=g) * (torch.rand(N, Fn, generator=g) < 0.3)
    a[2] = 0.0  # a token with nothing active
    a.requires_grad_()
    out = sp.decode_rows(W, a)
    expected = torch.stack([a @ W[:, j] for j in range(n_out)], 1)  # [N, n_out, D]
    close(out, expected, seed, "decode_rows value")
    G = torch.randn(N, n_out, D, generator=g)
    got_a, got_W = torch.autograd.grad(out, [a, W], G)
    want_a, want_W = torch.autograd.grad(expected, [a, W], G)
    close(got_W, want_W, seed, "decode_rows d W")
    # the sparse product lists only a's nonzeros: its gradient is the dense one there, and 0 elsewhere (so no
    # gradcheck in a: a finite difference at a zero entry makes it nonzero, i.e. listed)
    close(got_a, torch.where(a != 0, want_a, 0.0), seed, "decode_rows d a (at a's nonzeros)")


# ====================================================================== _ListedPreActs / listed_pre_acts
def ref_pre(x, W_enc, b_enc):
    """pre[:, l] = x[:, l] @ W_enc[l] + b_enc[l], plain autograd: [N, L, F]."""
    return torch.stack([x[:, l] @ W_enc[l] + b_enc[l] for l in range(x.shape[1])], 1)


def make_enc(g, N, L, D, Fn, x_layout, dtype=torch.float32):
    if x_layout == "layer_major":  # the trainer's x: [N, L, D] viewed from a [L, N, D] buffer
        x = torch.randn(L, N, D, generator=g, dtype=dtype).transpose(0, 1)
    else:
        x = torch.randn(N, L, D, generator=g, dtype=dtype)
    W_enc = (torch.randn(L, D, Fn, generator=g, dtype=dtype) / D**0.5).requires_grad_()
    b_enc = torch.randn(L, Fn, generator=g, dtype=dtype).requires_grad_()
    return x, W_enc, b_enc


@pytest.mark.parametrize("x_layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("api", ["apply", "listed_pre_acts"])
def test_listed_pre_acts_value_gradient(seed, x_layout, api):
    g = gen(seed)
    N, L, D, Fn = 7, 4, 5, 9
    x, W_enc, b_enc = make_enc(g, N, L, D, Fn, x_layout)
    lst = Listing.of(make_mask(g, N, L, Fn))
    pre = ref_pre(x, W_enc, b_enc)
    expected = pre[lst.rows, lst.lay, lst.feats]  # the gather, under autograd
    if api == "apply":
        vals = _ListedPreActs.apply(x, pre.detach(), lst, W_enc, b_enc)
    else:
        vals = sp.listed_pre_acts(W_enc, b_enc, x, pre.detach(), lst)
    close(vals, expected, seed, f"{api} value", rtol=0, atol=0)
    R = torch.randn(len(vals), generator=g)
    got = torch.autograd.grad(vals, [W_enc, b_enc], R)
    want = torch.autograd.grad(expected, [W_enc, b_enc], R)
    close(got[0], want[0], seed, f"{api} d W_enc")
    close(got[1], want[1], seed, f"{api} d b_enc")
    assert torch.equal(got[0][1], torch.zeros(D, Fn)), why(seed, "a layer listing nothing: d W_enc[1] = 0")


@pytest.mark.parametrize("x_layout", ["token_major", "layer_major"])
def test_listed_pre_acts_gradcheck(seed, x_layout):
    """pre is an input computed without autograd; here it is recomputed from W_enc, b_enc inside the checked
    function, so the finite differences see what the analytic backward claims."""
    g = gen(seed)
    N, L, D, Fn = 5, 3, 3, 6
    x, W_enc, b_enc = make_enc(g, N, L, D, Fn, x_layout, torch.float64)
    lst = Listing.of(make_mask(g, N, L, Fn, density=0.35))

    def fn(W, b):
        return _ListedPreActs.apply(x, ref_pre(x, W, b).detach(), lst, W, b)

    check_grad(fn, (W_enc, b_enc), seed, "_ListedPreActs gradcheck")


# ====================================================================== JumpReLU / Step (straight-through)
THRESHOLD_SHAPES = {  # (x shape, threshold shape): per-feature, per-layer-feature, broadcast in other dims
    "N,F|F": ((6, 5), (5,)),
    "N,L,F|L,F": ((6, 3, 5), (3, 5)),
    "N,L,F|1,F": ((6, 3, 5), (1, 5)),
    "N,L,F|L,1": ((6, 3, 5), (3, 1)),
    "N,F|scalar": ((6, 5), ()),
}


def sum_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast result back to `shape` (leading dims, then dims of size 1)."""
    t = t.sum(dim=tuple(range(t.dim() - len(shape)))) if t.dim() > len(shape) else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def make_near_threshold(g, x_shape, th_shape, bw, dtype):
    """theta (mixed signs), and x = theta + bw·u with u in (-2, 2) kept ≥ 0.02 away from the kernel edges ±1/2
    and from the threshold itself, so that no comparison is decided by rounding."""
    theta = (torch.randn(th_shape, generator=g, dtype=torch.float64) * 0.7 + 0.3).to(dtype)
    u = torch.rand(x_shape, generator=g, dtype=torch.float64) * 4 - 2
    edge = (u.abs() - 0.5).abs() < 0.02
    u = torch.where(edge, u + torch.sign(u) * 0.05, u)
    u = torch.where(u.abs() < 0.02, torch.full_like(u, 0.05), u)
    x = (theta.double() + bw * u).to(dtype)
    return x, theta


@pytest.mark.parametrize("shapes", list(THRESHOLD_SHAPES), ids=list(THRESHOLD_SHAPES))
@pytest.mark.parametrize("bw", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_jumprelu_and_step_against_the_documented_estimator(seed, shapes, bw, dtype):
    g = gen(seed)
    x_shape, th_shape = THRESHOLD_SHAPES[shapes]
    x, theta = make_near_threshold(g, x_shape, th_shape, bw, dtype)
    x.requires_grad_()
    theta.requires_grad_()
    R = torch.randn(x_shape, generator=g, dtype=dtype)
    th = theta.detach().expand(x_shape)
    xd = x.detach()
    H = torch.heaviside(xd - th, torch.zeros((), dtype=dtype))  # H(0) = 0: x == θ is off
    K = (((xd - th) / bw).abs() < 0.5).to(dtype)  # rectangle kernel of width bw around θ
    n_window = int(K.sum())
    assert 0 < n_window < K.numel(), why(seed, "the inputs should put some but not all x inside the window")

    # JumpReLU: a = x·H(x−θ); ∂a/∂x = H(x−θ); ∂a/∂θ ≈ −θ/ε · K((x−θ)/ε), summed over broadcast dims
    a = jumprelu(x, theta, bw)
    close(a, xd * H, seed, "jumprelu value", rtol=0, atol=0)
    gx, gt = torch.autograd.grad(a, [x, theta], R)
    close(gx, R * H, seed, "jumprelu d x", rtol=0, atol=0)
    close(gt, sum_to_shape(R * (-th / bw) * K, th_shape), seed, "jumprelu d theta")

    # Step: H(x−θ); ∂/∂x = 0; ∂/∂θ ≈ −1/ε · K((x−θ)/ε), summed over broadcast dims
    h = step(x, theta, bw)
    close(h, H, seed, "step value", rtol=0, atol=0)
    gx, gt = torch.autograd.grad(h, [x, theta], R)
    assert torch.equal(gx, torch.zeros_like(xd)), why(seed, "step d x is exactly 0")
    close(gt, sum_to_shape(R * (-1.0 / bw) * K, th_shape), seed, "step d theta")


def test_jumprelu_and_step_at_the_edges():
    """The conventions at the edges: x == θ is off (strict H), and the kernel is the open interval (−1/2, 1/2)."""
    bw = 1.0
    theta = torch.tensor([0.25, 0.25, 0.25, 0.25], requires_grad=True)
    x = torch.tensor([0.25, 0.75, -0.25, 0.5])  # u = 0, +1/2, −1/2, +1/4 (all exact in binary)
    a = jumprelu(x, theta, bw)
    assert a.tolist() == [0.0, 0.75, 0.0, 0.5]
    (gt,) = torch.autograd.grad(a.sum(), theta)
    assert gt.tolist() == [-0.25, 0.0, 0.0, -0.25]
    (gt,) = torch.autograd.grad(step(x, theta, bw).sum(), theta)
    assert gt.tolist() == [-1.0, 0.0, 0.0, -1.0]


@pytest.mark.parametrize("fn", ["jumprelu", "step"])
def test_jumprelu_step_gradcheck_in_x(seed, fn):
    """gradcheck applies only to the x-gradient, and only away from the threshold: there x·H(x−θ) and H(x−θ) are
    smooth in x (derivative H and 0), so central differences (eps 1e-6, x at least 0.02·bw from θ) agree with the
    backward. The θ-gradient is a pseudo-gradient by design (the true derivative is 0 or a Dirac delta), so
    finite differences cannot check it; it is checked against the written-out formula above instead."""
    g = gen(seed)
    x, theta = make_near_threshold(g, (5, 3, 4), (3, 4), 0.5, torch.float64)
    f = jumprelu if fn == "jumprelu" else step
    check_grad(lambda xx: f(xx, theta, 0.5), (x.requires_grad_(),), seed, f"{fn} gradcheck in x")


# ====================================================================== TopK / BatchTopK
def kth_largest(v: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """The k-th largest value along dim by a full descending sort (keepdim)."""
    return v.sort(dim=dim, descending=True).values.narrow(dim, k - 1, 1)


def ref_batch_cutoff(pre: torch.Tensor, k: int) -> torch.Tensor:
    N, L, Fn = pre.shape
    flat = pre.detach().permute(1, 0, 2).reshape(L, N * Fn)
    return kth_largest(flat, min(k * N, N * Fn))[:, 0]


@pytest.mark.parametrize("shape", [(6, 10), (5, 3, 8)], ids=["N,F", "N,L,F"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_value_gradient(seed, shape, k):
    g = gen(seed)
    x = torch.randn(shape, generator=g)
    x[1] = -x[1].abs() - 0.1  # a row with no positive value
    x[2] = -x[2].abs() - 0.1
    x[2, ..., 0] = 1.0  # a row with fewer positives than k
    x.requires_grad_()
    keep = (x.detach() >= kth_largest(x.detach(), k)) & (x.detach() > 0)
    out = topk(x, k)
    close(out, torch.where(keep, x.detach(), 0.0), seed, "topk value", rtol=0, atol=0)
    R = torch.randn(shape, generator=g)
    (gx,) = torch.autograd.grad(out, x, R)
    close(gx, torch.where(keep, R, 0.0), seed, "topk d x", rtol=0, atol=0)


@pytest.mark.parametrize("case", ["small", "k_over_F", "mostly_negative", "ties", "layer_major"])
def test_batch_topk_cutoff_mask_and_topk_small(seed, case):
    g = gen(seed)
    N, L, Fn, k = 6, 3, 10, 2
    pre = torch.randn(N, L, Fn, generator=g)
    if case == "k_over_F":
        k = Fn + 3  # K = min(k·N, N·F) = every entry
    elif case == "mostly_negative":
        pre = pre - 2.0  # only a few positives: the cut-off is ≤ 0 and only the positives are kept
        k = 4
    elif case == "ties":
        pre = torch.randint(-3, 4, (N, L, Fn), generator=g).float()
    elif case == "layer_major":
        pre = pre.transpose(0, 1).contiguous().transpose(0, 1)
    cut = batch_topk_cutoff(pre, k)
    assert torch.equal(cut, ref_batch_cutoff(pre, k)), why(seed, f"batch_topk_cutoff {case}: {cut}")
    keep = (pre >= ref_batch_cutoff(pre, k)[None, :, None]) & (pre > 0)
    if case == "mostly_negative":
        assert (ref_batch_cutoff(pre, k) <= 0).any(), why(seed, "the case should have a non-positive cut-off")
    assert torch.equal(batch_topk_mask(pre, k), keep), why(seed, f"batch_topk_mask {case}")
    x = pre.clone().requires_grad_()
    out = batch_topk(x, k)
    assert torch.equal(out, torch.where(keep, pre, 0.0)), why(seed, f"batch_topk value {case}")
    R = torch.randn(N, L, Fn, generator=g)
    (gx,) = torch.autograd.grad(out, x, R)
    assert torch.equal(gx, torch.where(keep, R, 0.0)), why(seed, f"batch_topk d x {case}")


def test_batch_topk_2d(seed):
    g = gen(seed)
    N, Fn, k = 8, 12, 3
    x = torch.randn(N, Fn, generator=g).requires_grad_()
    kth = kth_largest(x.detach().reshape(-1), k * N)
    keep = (x.detach() >= kth) & (x.detach() > 0)
    out = batch_topk(x, k)
    assert out.shape == (N, Fn)
    assert torch.equal(out, torch.where(keep, x.detach(), 0.0)), why(seed, "batch_topk [N, F] value")
    R = torch.randn(N, Fn, generator=g)
    (gx,) = torch.autograd.grad(out, x, R)
    assert torch.equal(gx, torch.where(keep, R, 0.0)), why(seed, "batch_topk [N, F] d x")


def test_batch_topk_cutoff_subsample_path_and_fallback(seed):
    """K = k·N = 16384 ≥ 1024·16 and 4K ≤ N·F: the CPU takes the 1/16-subsample path. Layer 0 is plain noise
    (the subsample bound lets ≥ K values through); in layer 1 every 16th entry of the flattened layer (feature
    ≡ 0 mod 16, the entries the subsample reads) is large, so the bound is high, fewer than K values pass it and
    the full top-K fallback runs. Layer 2 has integer ties. All three cut-offs must be the exact K-th value."""
    g = gen(seed)
    N, L, Fn, k, stride = 128, 3, 512, 128, 16
    K = k * N
    assert K >= 1024 * stride and 4 * K <= N * Fn
    pre = torch.randn(L, N, Fn, generator=g)  # layer-major, as the encoder lays it out
    pre[1, :, ::stride] += 10.0
    pre[2] = torch.randint(-40, 41, (N, Fn), generator=g).float()
    pre = pre.transpose(0, 1)
    flat = pre.permute(1, 0, 2).reshape(L, N * Fn)
    bound = kth_largest(flat[:, ::stride], K * 5 // (4 * stride))[:, 0]  # the construction, checked
    passed = (flat >= bound[:, None]).sum(1)
    assert passed[0] >= K and passed[1] < K, why(seed, f"layer 0 on the sampled path, layer 1 falls back: {passed}")
    cut = batch_topk_cutoff(pre, k)
    assert torch.equal(cut, ref_batch_cutoff(pre, k)), why(seed, f"cut-off {cut} vs {ref_batch_cutoff(pre, k)}")
    keep = (pre >= ref_batch_cutoff(pre, k)[None, :, None]) & (pre > 0)
    assert torch.equal(batch_topk_mask(pre, k), keep), why(seed, "batch_topk_mask on the sampled path")


# ====================================================================== memory-order AdamW
LR, BETAS, WD = 1e-2, (0.9, 0.99), 0.1


def make_params(g: torch.Generator, target_major: bool = True) -> list[torch.nn.Parameter]:
    """A CLT's W_dec (target-major or contiguous), W_enc, b_enc, a transposed matrix, a 4-d permuted tensor
    and a scalar."""
    L, Fn, D = 3, 6, 4
    ps = []
    for s in range(L):
        data = torch.randn(L - s, Fn, D, generator=g)
        ps.append(data.transpose(0, 1) if target_major else data.transpose(0, 1).contiguous())
    ps.append(torch.randn(L, D, Fn, generator=g))
    ps.append(torch.randn(L, Fn, generator=g))
    ps.append(torch.randn(7, 5, generator=g).t() if target_major else torch.randn(5, 7, generator=g))
    ps.append(torch.randn(2, 3, 4, 5, generator=g).permute(2, 0, 3, 1))
    ps.append(torch.randn((), generator=g))
    return [torch.nn.Parameter(p) for p in ps]


def copy_like(params, target_major: bool) -> list[torch.nn.Parameter]:
    ref = make_params(torch.Generator().manual_seed(0), target_major)  # only for the layouts
    with torch.no_grad():
        for r, p in zip(ref, params):
            r.copy_(p)
    return ref


def set_grads(params, grads, mode: str) -> None:
    """'backward': through autograd (the gradient follows its parameter's layout); 'assigned': contiguous."""
    if mode == "backward":
        loss = sum((p * gr).sum() for p, gr in zip(params, grads) if gr is not None)
        loss.backward()
    else:
        for p, gr in zip(params, grads):
            p.grad = None if gr is None else gr.clone()
    for p, gr in zip(params, grads):
        assert (p.grad is None) == (gr is None)


def draw_grads(g, params, step_i: int):
    grads = [torch.randn(p.shape, generator=g) for p in params]
    if step_i == 2:
        grads[4] = None  # b_enc without a gradient this step: both optimizers skip it
    return grads


def run_steps(opt, ref_opt, params, ref_params, g, steps, mode, seed, start=0):
    for i in range(start, start + steps):
        grads = draw_grads(g, params, i)
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = LR * (1 + 0.5 * i)  # the trainer's schedule writes the LR into param_groups
        opt.zero_grad()
        ref_opt.zero_grad()
        set_grads(params, grads, mode)
        for r, gr in zip(ref_params, grads):
            r.grad = None if gr is None else gr.clone()
        opt.step()
        ref_opt.step()
        for j, (p, r) in enumerate(zip(params, ref_params)):
            close(p.detach(), r.detach(), seed, f"AdamW param {j} after step {i + 1} ({mode})", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["backward", "assigned"])
def test_memory_order_adamw_matches_torch_adamw(seed, mode):
    g = gen(seed)
    params = make_params(g)
    layouts = [(p.stride(), p.data_ptr()) for p in params]
    assert not params[0].is_contiguous() and not params[5].is_contiguous() and not params[6].is_contiguous()
    ref_params = [torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in params]
    opt = AdamW(params, LR, BETAS, WD)
    ref_opt = torch.optim.AdamW(ref_params, lr=LR, betas=BETAS, weight_decay=WD, foreach=False)
    run_steps(opt, ref_opt, params, ref_params, g, 5, mode, seed)
    moved = sum(float((p.detach() - q.detach()).abs().max()) for p, q in zip(params, make_params(gen(seed))))
    assert moved > 1e-2, why(seed, "the steps should move the parameters")
    # in place: the module's own tensors, in their own layout
    assert [(p.stride(), p.data_ptr()) for p in params] == layouts, why(seed, "parameters kept their memory")


@pytest.mark.parametrize("load_layout", ["same", "other"])
def test_memory_order_adamw_state_round_trip(seed, load_layout):
    """state_to_flat: the moments in the parameters' shapes (equal to torch AdamW's); after a checkpoint-like
    round trip (contiguous tensors, JSON meta) into parameters of the same or the other memory layout, further
    steps still match torch AdamW continuing without interruption."""
    g = gen(seed)
    params = make_params(g)
    ref_params = [torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in params]
    opt = AdamW(params, LR, BETAS, WD)
    ref_opt = torch.optim.AdamW(ref_params, lr=LR, betas=BETAS, weight_decay=WD, foreach=False)
    run_steps(opt, ref_opt, params, ref_params, g, 3, "backward", seed)

    tensors, meta = opt.state_to_flat()
    for j, (p, r) in enumerate(zip(params, ref_params)):
        st = ref_opt.state[r]
        for key in ("exp_avg", "exp_avg_sq"):
            t = tensors[f"optim.{j}.{key}"]
            assert t.shape == p.shape, why(seed, f"{key} of param {j} in the parameter's shape")
            close(t, st[key], seed, f"state_to_flat {key} of param {j}", rtol=1e-6, atol=1e-7)
        assert float(tensors[f"optim.{j}.step"]) == float(st["step"]), why(seed, f"step of param {j}")
    assert float(tensors["optim.4.step"]) == 2.0, why(seed, "the param without a gradient at step 3 took 2 steps")

    saved = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # what safetensors stores
    meta = json.loads(json.dumps(meta))
    params2 = copy_like(params, target_major=(load_layout == "same"))
    opt2 = AdamW(params2, 0.0, (0.5, 0.5), 0.0)  # hyper-parameters come from the checkpoint
    opt2.load_flat(saved, meta)
    assert [gr["lr"] for gr in opt2.param_groups] == [gr["lr"] for gr in ref_opt.param_groups]
    assert tuple(opt2.param_groups[0]["betas"]) == BETAS and opt2.param_groups[0]["weight_decay"] == WD
    back, _ = opt2.state_to_flat()
    assert back.keys() == saved.keys()
    for k in saved:
        close(back[k], saved[k], seed, f"{k} after load_flat", rtol=0, atol=0)
    run_steps(opt2, ref_opt, params2, ref_params, g, 3, "backward", seed, start=3)


def test_batch_topk_keeps_positive_subnormals():
    """A non-positive cut-off keeps exactly the positive values, subnormal ones included."""
    x = -torch.ones(2, 1, 4)
    x[0, 0, 0] = 1e-40  # subnormal in float32
    assert batch_topk_mask(x, 3).sum() == 1 and batch_topk_mask(x, 3)[0, 0, 0]


def test_memory_order_adamw_contiguous_parameter_with_strided_gradient():
    """A gradient assigned by hand in another layout than its (contiguous) parameter is stepped correctly."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(6, 4)
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW([q], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    p.grad, q.grad = g.t(), g.t().contiguous()
    opt.step()
    ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="permutation of contiguous memory"):
        AdamW([torch.nn.Parameter(torch.randn(4, 6)[:, ::2])], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
