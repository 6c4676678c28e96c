"""What a feature does to the output, and which input tokens drive it, from the weights alone.

Output effects (the "promoted / suppressed tokens" of a dashboard). A feature's decoder vector is carried to
the logits through the final norm, frozen at a typical scale, and the unembedding:

    effect_v = (norm_final(w) − norm_final(0)) · W_U[v]          w: [D] the decoder write, v: a vocabulary token

Which write w: by default (`write="last"`) the feature's write into the LAST layer it writes to,
W_dec[s][:, n_out(s) − 1] (a CLT: into layer L − 1; a PLT: its own layer s, its only write). For a CLT that
write reaches the logits with no MLP after it: its effect on them is direct. The earlier writes reach the
final residual stream too, but they also pass through, and are re-read by, every later layer, so what they
do to the logits is not only what they add. `write="sum"` takes the sum of all the feature's writes
instead: the total direct effect through the residual stream in the frozen model (for a PLT the same).

The final norm is frozen at the mean of its 1/rms (1/std for LayerNorm) factor over the tokens of the
feature pass (`Summary.final_scale`, measured on the same corpus), so it is the linear map the model applies
at a typical token: the norm weight (Gemma: 1 + w) times that scale, minus the mean for LayerNorm; its bias
cancels in the difference. A final logit soft-cap (Gemma 2) is left out: it is monotone and changes no
ranking. A simpler variant skips the norm (w · W_U[v], the decoder's "logit lens"); it differs only by
the per-dimension norm weight and one global scale.

Input effects: the vocabulary tokens whose embeddings push the feature's pre-activation highest. A token's
embedding (the model's embedding module, scaled as the model scales it, e.g. Gemma's √D; GPT-2's position
embedding is left out) is put through the read point's norm of layer s (`mlp_in`: that layer's pre-MLP norm,
with the scale computed from the embedding alone, as if it were the whole residual stream; `resid_mid`: no
norm) and the encoder: pre_v = x_v · W_enc[s] + b_enc[s].

Both are batched over features with matmuls and chunked over the vocabulary (at most `max_elements` logits
at a time). Special tokens and embedding rows no tokenizer id maps to are never listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cltrace.models.adapter import Frozen


@dataclass
class Effects:
    """Per feature: the n most promoted and suppressed tokens, and the n input tokens that drive it most."""

    out_top_ids: Tensor  # [L, F, n] int64, largest effect first
    out_top_vals: Tensor  # [L, F, n] float32
    out_bottom_ids: Tensor  # [L, F, n] int64, most negative first
    out_bottom_vals: Tensor  # [L, F, n]
    in_top_ids: Tensor  # [L, F, n] int64
    in_top_vals: Tensor  # [L, F, n] pre-activation of the token's embedding
    final_scale: float
    write: str


def listable_tokens(model) -> Tensor:
    """[V] bool: vocabulary ids worth listing (a tokenizer id, not a special token)."""
    V = model.vocab_size
    ok = torch.arange(V) < len(model.tokenizer)
    special = [int(i) for i in getattr(model.tokenizer, "all_special_ids", []) if i is not None and 0 <= i < V]
    ok[special] = False
    return ok


def decoder_write(tc, layer: int, write: str = "last") -> Tensor:
    """[F, D]: the write of each feature of `layer` that output effects use (see the module docstring)."""
    W = tc.decoder(layer)  # [F, n_out, D]
    if write == "last":
        return W[:, -1]
    if write == "sum":
        return W.sum(1)
    raise ValueError(f"write must be 'last' or 'sum', not {write!r}")


def frozen_final_norm(model, h: Tensor, scale: float) -> Tensor:
    """h [N, D] -> [N, D]: the final norm as the linear map it is at 1/rms = `scale` (its bias removed)."""
    module = model.family.final_norm(model.body)
    frozen = Frozen(scales={"final": torch.full((1, 1), float(scale), device=h.device)})
    h = h.to(model.dtype)
    zero = model.norm(module, torch.zeros_like(h[:1]), "final", frozen, Frozen())
    return (model.norm(module, h, "final", frozen, Frozen()) - zero).float()


@torch.no_grad()
def output_effects(model, tc, final_scale: float, *, n: int = 10, write: str = "last",
                   max_elements: int = 1 << 25, progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top ids, top values, bottom ids, bottom values), each [L, F, n]: the tokens each feature's decoder write
    promotes and suppresses most (see the module docstring)."""
    ok = listable_tokens(model).to(model.device)
    W_U = model.W_U  # [V, D]
    per_layer = []
    for layer in _layers(tc, progress, "output effects"):
        h = frozen_final_norm(model, decoder_write(tc, layer, write).to(model.device), final_scale)  # [F, D]
        per_layer.append(_extremes_over_vocab(lambda lo, hi, h=h: h @ W_U[lo:hi].float().T, ok, n, h.shape[0],
                                              max_elements, bottom=True))
    top_ids, top_vals, bot_ids, bot_vals = (torch.stack([r[i] for r in per_layer]).cpu() for i in range(4))
    return top_ids, top_vals, bot_ids, bot_vals


def _layers(tc, progress: bool, what: str):
    """range(L), with a progress bar (layers/s, ETA) when asked: the effects cost F·V·D per layer."""
    if not progress:
        return range(tc.n_layers)
    from tqdm import tqdm  # a dependency; imported here so that importing this module stays light

    return tqdm(range(tc.n_layers), desc=what, unit="layer", leave=False)


def token_inputs(model, tc, layer: int, ids: Tensor) -> Tensor:
    """ids [c] -> [c, D]: what layer `layer`'s features read when the token's embedding is the whole stream."""
    e = model.hf.get_input_embeddings()(ids)  # [c, D] (Gemma's module includes its √D scale)
    if tc.cfg.reads == "mlp_in":
        module = model.family.norms(model.blocks[layer])["mlp_in"]
        e = model.norm(module, e, f"{layer}.mlp_in", None, Frozen())  # the scale of the embedding alone
    return e.to(tc.b_enc.dtype)


@torch.no_grad()
def input_effects(model, tc, *, n: int = 10, max_elements: int = 1 << 25,
                  progress: bool = False) -> tuple[Tensor, Tensor]:
    """(ids, values), each [L, F, n]: the tokens whose embeddings give each feature its highest pre-activation."""
    ok = listable_tokens(model).to(model.device)
    ids_out, vals_out = [], []
    for layer in _layers(tc, progress, "input effects"):
        def pre(lo: int, hi: int, layer: int = layer) -> Tensor:  # [F, c], contiguous (the top-k runs along c)
            ids = torch.arange(lo, hi, device=model.device)
            x = token_inputs(model, tc, layer, ids).to(tc.b_enc.device)
            return torch.addmm(tc.b_enc[layer][:, None], tc.encoder(layer).T, x.T).float().to(model.device)

        i, v = _extremes_over_vocab(pre, ok, n, tc.n_features, max_elements)
        ids_out.append(i)
        vals_out.append(v)
    return torch.stack(ids_out).cpu(), torch.stack(vals_out).cpu()


def _extremes_over_vocab(score, ok: Tensor, n: int, n_rows: int, max_elements: int, *,
                         bottom: bool = False) -> tuple[Tensor, ...]:
    """The n largest (and with `bottom` the n smallest) of score(lo, hi) [rows, hi − lo] over the listable ids,
    a contiguous chunk of the vocabulary at a time (a slice of the unembedding, no gathered copy; ids that are
    not listable are masked): (ids [rows, n], values [rows, n]) sorted from the extreme, once or twice."""
    V = ok.numel()
    chunk = max(1, max_elements // max(n_rows, 1))
    best = [(torch.full((n_rows, 0), torch.nan, device=ok.device),
             torch.zeros(n_rows, 0, dtype=torch.int64, device=ok.device)) for _ in range(1 + bottom)]
    for lo in range(0, V, chunk):
        hi = min(V, lo + chunk)
        if not ok[lo:hi].any():
            continue
        s = score(lo, hi)  # [rows, c]
        masked = (~ok[lo:hi]).nonzero()[:, 0]  # the few columns never listed: filled in place, no copy of s
        ids = torch.arange(lo, hi, device=ok.device)
        for j, largest in enumerate((True, False)[:1 + bottom]):
            s.index_fill_(1, masked, -torch.inf if largest else torch.inf)
            top_v, k = s.topk(min(n, s.shape[1]), dim=1, largest=largest)  # the chunk's best, merged below
            v, i = torch.cat([best[j][0], top_v], 1), torch.cat([best[j][1], ids[k]], 1)
            top_v, k = v.topk(min(n, v.shape[1]), dim=1, largest=largest)  # sorted from the extreme
            best[j] = (top_v, i.gather(1, k))
    out = (best[0][1], best[0][0])
    return out + (best[1][1], best[1][0]) if bottom else out
