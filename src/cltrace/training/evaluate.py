"""How good is a transcoder: reconstruction on its own, and spliced into the model in place of every MLP.

Reconstruction (at the positions transcoders train on: not BOS or other special tokens):
    nmse_l = Σ‖ŷ_l − y_l‖² / Σ‖y_l − ȳ_l‖²     explained_variance_l = 1 − Var(y_l − ŷ_l) / Var(y_l)
    l0_l   = mean active features of layer l    dead_fraction = features that never fired on the eval tokens

Replacement model: every MLP output replaced by the transcoder's reconstruction, layer by layer, so each
layer's features read the *replacement's* own MLP inputs (a CLT's output at layer l needs the features of
layers ≤ l, which were encoded as the forward passed them). Against the original, on held-out text:
    ce_increase = CE(spliced) − CE(original) of the next token;  kl = KL(original ‖ spliced) per position;
    top1_agreement = how often both predict the same next token, over every position;
    last_top1_agreement = the same at the last position of each context only (the paper's per-prompt statistic:
    the fraction of prompts whose next token the replacement model gets as the model does).
Special-token positions keep their true MLP output (they are outside the training distribution).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from cltrace.data import ContextStream, keep_mask
from cltrace.data.tokens import special_tokens
from cltrace.errors import CltraceError
from cltrace.transcoders.io import check_fits
from cltrace.transcoders.transcoder import Transcoder


class _Splice:
    """An mlp_hook that encodes each layer's MLP input as the forward reaches it and decodes layer l.

    replace=False records (x, ŷ, acts) but returns the true output (for reconstruction metrics).
    """

    def __init__(self, tc: Transcoder, keep: Tensor, replace: bool):
        self.tc, self.keep, self.replace = tc, keep, replace  # keep [B, T] bool: positions to splice
        self.pending: Tensor | None = None  # [N, L, D] decoder sums waiting for their target layer
        self.acts: list[Tensor] = []  # [N, F] per layer
        self.recon: list[Tensor] = []  # [N, D] per layer
        self.true: list[Tensor] = []  # [N, D] per layer: the model's own MLP outputs (recording only)

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> Tensor:
        tc = self.tc
        B, T, D = x.shape
        xf = x.reshape(B * T, D).to(tc.b_enc.dtype)  # [N, D]
        a = tc.activate(tc.pre_acts(xf, layer), layer, training=False)  # [N, F]
        if self.pending is None:
            self.pending = xf.new_zeros(B * T, tc.n_layers, D)
        n = tc.n_out(layer)
        self.pending[:, layer:layer + n] += tc.decode_source(layer, a)  # [N, n_out, D]
        recon = self.pending[:, layer] + tc.b_dec[layer]
        if tc.W_skip is not None:
            recon = recon + xf @ tc.W_skip[layer]
        self.acts.append(a)
        self.recon.append(recon)
        if not self.replace:
            self.true.append(y.reshape(B * T, D).float())
            return y
        out = torch.where(self.keep.reshape(B * T, 1), recon.to(y.dtype), y.reshape(B * T, D))
        return out.view(B, T, D)


def default_split(corpus_spec) -> str:
    """The split to evaluate on when none is named: "eval" (the held-out 2%) for the built-in corpora and hub
    datasets, which training reads; "all" for a local file or folder, which is text the user holds out (its
    hash split alone is too small to fill a context: a 259 KB file holds out about 5 KB)."""
    if corpus_spec is None or str(corpus_spec) in ("small", "large") or str(corpus_spec).startswith("hf:"):
        return "eval"
    return "all" if Path(str(corpus_spec)).expanduser().exists() else "eval"


def eval_contexts(model, corpus_spec=None, n_tokens: int = 8192, context_len: int = 128, *,
                  split: str | None = None, n_contexts: int | None = None) -> Tensor:
    """[B, T] contexts of the corpus' `split` ("eval", "train" or "all"; None: `default_split`), about n_tokens;
    or exactly n_contexts when given (an error if the split holds fewer: the per-prompt statistic is then over
    a known number of prompts)."""
    split = split or default_split(corpus_spec)
    stream = ContextStream(corpus_spec, model.tokenizer, context_len, split=split, loop=False)
    want = n_contexts if n_contexts is not None else max(1, math.ceil(n_tokens / context_len))
    ctxs = stream.take(want)
    what = "held-out split" if split == "eval" else f"{split!r} split"
    if not ctxs:
        hint = " (evaluate a file you hold out whole with split 'all')" if split != "all" else ""
        raise CltraceError(f"the {what} of corpus {corpus_spec or 'small'} has no context of {context_len} "
                           f"tokens: use a larger corpus or a shorter context{hint}")
    if n_contexts is not None and len(ctxs) < n_contexts:
        raise CltraceError(f"the {what} of corpus {corpus_spec or 'small'} holds {len(ctxs)} contexts of "
                           f"{context_len} tokens, not {n_contexts}: ask for fewer or use a shorter --context-len")
    return torch.tensor(ctxs, dtype=torch.long)


@torch.no_grad()
def evaluate(model, transcoder: Transcoder, corpus_spec=None, n_tokens: int = 8192, *, context_len: int = 128,
             batch_size: int = 8, ids: Tensor | None = None, splice_special: bool = False, split: str | None = None,
             n_contexts: int | None = None, log=None) -> dict:
    """Reconstruction and replacement-model metrics of `transcoder` on `model` (see the module docstring).

    ids [B, T]: evaluate on these contexts instead of the corpus' held-out split.
    split: the corpus split to read ("eval", "train", "all"; None: "eval" for built-in corpora, "all" for a
    local file or folder, see `default_split`); recorded in the result.
    n_contexts: exactly this many contexts of the split instead of about n_tokens tokens (`eval_contexts`).
    Returns a JSON-able dict: nmse, explained_variance, l0, dead_fraction, ce_original, ce_spliced,
    ce_increase, kl, top1_agreement (means), the per-layer lists *_layers, and n_tokens.
    """
    tc = transcoder.eval()
    check_fits(tc, model)
    ids_from_corpus = ids is None
    if ids is None:
        split = split or default_split(corpus_spec)
        ids = eval_contexts(model, corpus_spec, n_tokens, context_len, split=split, n_contexts=n_contexts)
    ids = ids.to(model.device)
    _, _, specials = special_tokens(model.tokenizer)
    L, Fn = tc.n_layers, tc.n_features
    err = torch.zeros(L, dtype=torch.float64)  # Σ‖ŷ − y‖²
    sy, sy2 = torch.zeros(L, model.d_model, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    se, se2 = torch.zeros(L, model.d_model, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    l0 = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(L, Fn, dtype=torch.bool)
    ce0 = ce1 = kl = agree = last_agree = 0.0
    n_rec = n_pred = 0
    for i in range(0, ids.shape[0], batch_size):
        b = ids[i:i + batch_size]  # [B, T]
        keep = torch.ones_like(b, dtype=torch.bool) if splice_special else keep_mask(b, specials)
        rec = _Splice(tc, keep, replace=False)
        logits0 = model.forward(b, mlp_hook=rec).logits.float()  # [B, T, V]
        kf = keep.reshape(-1).cpu()
        y = torch.stack(rec.true, 1).cpu()[kf].double()  # [N, L, D]
        r = torch.stack(rec.recon, 1).cpu()[kf].double()  # [N, L, D]
        a = torch.stack(rec.acts, 1).cpu()[kf]  # [N, L, F]
        e = r - y
        err += e.pow(2).sum((0, 2))
        sy += y.sum(0)
        sy2 += y.pow(2).sum((0, 2))
        se += e.sum(0)
        se2 += e.pow(2).sum((0, 2))
        l0 += (a != 0).sum((0, 2)).double()
        fired |= (a != 0).any(0)
        n_rec += int(kf.sum())

        spl = _Splice(tc, keep, replace=True)
        logits1 = model.forward(b, mlp_hook=spl).logits.float()
        for j in range(b.shape[0]):  # one context at a time: a 262k vocabulary makes [B, T, V] temporaries GBs
            lp0 = logits0[j, :-1].log_softmax(-1)  # [T-1, V] predictions of tokens 1..T-1
            lp1 = logits1[j, :-1].log_softmax(-1)
            tgt = b[j, 1:, None]
            ce0 += -lp0.gather(-1, tgt).sum().item()
            ce1 += -lp1.gather(-1, tgt).sum().item()
            kl += (lp0.exp() * (lp0 - lp1)).sum().item()
            agree += (lp0.argmax(-1) == lp1.argmax(-1)).sum().item()
            last_agree += float(logits0[j, -1].argmax() == logits1[j, -1].argmax())  # the paper's per-prompt one
            n_pred += tgt.numel()
        if log is not None:
            log(f"evaluated {min(i + batch_size, ids.shape[0])}/{ids.shape[0]} contexts")
    if n_rec == 0:
        raise CltraceError("no evaluation positions left after dropping special tokens: use longer contexts")
    var_y = sy2 / n_rec - (sy / n_rec).pow(2).sum(-1)  # [L] E‖y − ȳ‖²
    var_e = se2 / n_rec - (se / n_rec).pow(2).sum(-1)
    nmse = err / n_rec / var_y.clamp_min(1e-30)
    ev = 1 - var_e / var_y.clamp_min(1e-30)
    l0_layers = l0 / n_rec
    dead = ~fired
    out = {
        "nmse": nmse.mean().item(), "explained_variance": ev.mean().item(), "l0": l0_layers.mean().item(),
        "l0_total": l0_layers.sum().item(), "dead_fraction": dead.float().mean().item(),
        "ce_original": ce0 / n_pred, "ce_spliced": ce1 / n_pred, "ce_increase": (ce1 - ce0) / n_pred,
        "kl": kl / n_pred, "top1_agreement": agree / n_pred,
        "last_top1_agreement": last_agree / ids.shape[0], "n_contexts": ids.shape[0],
        "nmse_layers": _r(nmse), "explained_variance_layers": _r(ev), "l0_layers": _r(l0_layers),
        "dead_fraction_layers": _r(dead.float().mean(1)),
        "n_tokens": n_rec, "n_predictions": n_pred, "model": model.name, "kind": tc.cfg.kind,
        "activation": tc.cfg.activation, "n_features": Fn, "split": split if ids_from_corpus else None,
    }
    return out


def _r(t: Tensor) -> list[float]:
    return [round(float(v), 6) for v in t]
