"""One trainer for every architecture: CLT or PLT; JumpReLU, ReLU, TopK or BatchTopK; optional skip.

    for each step:
        x, y  <- next batch [N, L, D], divided by the per-layer scalars x_scale, y_scale
        pre, a, ŷ = forward (sparse decode of the active features; partial reconstructions summed over
                              feature shards by the `Dist` hooks, a no-op on one process)
        loss  = recon + λ(t)·sparsity + preact          (JumpReLU/ReLU)
              = recon + auxk                           (TopK/BatchTopK)
        backward; average gradients over data ranks; clip; AdamW step with the scheduled LR
    every `checkpoint_every` steps: atomic checkpoint (resume gives the same weights as no interruption)
    at the end: fold the normalization into the weights, save_transcoder, plot the curves

The distributed hooks (`split_batch`, `sum_over_features`, `average_gradients`) come from
`cltrace.training.distributed.Dist`; single-process runs get the identity version. Under data parallelism
the source built by `train` is this rank's share of the corpus (`rank`/`world`): its batches are this rank's
rows, not split again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from torch import Tensor

from cltrace.data import CachedActivations, StreamingActivations
from cltrace.data.activations import default_buffer_tokens
from cltrace.errors import CltraceError, SettingError
from cltrace.models.registry import DEFAULT_MODEL, display_name, load_model
from cltrace.runtime import keep_freed_memory, resolve_device
from cltrace.training.checkpoint import load_checkpoint, save_checkpoint
from cltrace.training.config import CONFIG_FILE, TrainConfig
from cltrace.training.distributed import (
    Dist,
    FailureGuard,
    checkpoint_dir,
    find_resume_checkpoint,
    init_distributed,
    shutdown,
)
from cltrace.training.losses import (
    auxk_loss,
    preact_loss,
    reconstruction_loss,
    tanh_sparsity,
)
from cltrace.training.metrics import FeatureStats, MetricsLog, plot_curves
from cltrace.training.optim import AdamW
from cltrace.training.resample import resample_dead, resample_generator, token_errors
from cltrace.training.schedule import lr_factor, retimed_steps, sparsity_factor
from cltrace.training.sharding import make_transcoder, sharded_auxk_acts, sharded_forward, shared_parameters
from cltrace.transcoders.io import save_transcoder
from cltrace.transcoders.sharded import save_shard
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
RETIME_AT = (0.05, 0.5)  # a time-budgeted run measures its step rate at these fractions of its planned steps
# fields that may differ between a run and its resumption (they do not change the result)
RUNTIME_FIELDS = {"device", "out", "log_every", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
                  "progress", "extra"}


class TrainingDiverged(CltraceError):
    """The loss or the gradient became NaN or Inf."""


class Trainer:
    def __init__(self, cfg: TrainConfig, source, *, model_name: str = "", dist=None, log=None):
        cfg.validate()
        keep_freed_memory()  # every step allocates the same large temporaries: reuse them, do not re-fault them
        self.cfg, self.source = cfg, source
        self.dist = dist if dist is not None else Dist()
        self.log = log or (lambda *a: None)
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out)
        self.model_name = model_name
        self.source_share = self.dist.source_is_share(source)  # batches are this data rank's rows already
        if cfg.resample_every and self.dist.distributed:
            raise SettingError("resampling dead features runs on one process only (resample_every=0 under "
                               "torchrun)", ("resample_every",))
        L, D = source.n_layers, source.d_model
        tc_cfg = TranscoderConfig(
            kind=cfg.kind, n_layers=L, d_model=D, n_features=cfg.features_per_layer, activation=cfg.activation,
            k=cfg.k, skip=cfg.skip, bandwidth=cfg.bandwidth, model_name=model_name,
        )
        torch.manual_seed(cfg.seed)
        # the whole transcoder, or with feature shards this rank's slice of every layer's features
        self.tc = make_transcoder(tc_cfg, self.dist, seed=cfg.seed, device=self.device).train()
        self.params = [p for p in self.tc.parameters()]
        self.opt = AdamW(self.params, cfg.lr, cfg.betas, cfg.weight_decay)
        self.stats = FeatureStats(L, self.tc.n_features, device=self.device)  # this shard's features
        self.x_scale = torch.ones(L, device=self.device)  # [L] inputs are divided by these
        self.y_scale = torch.ones(L, device=self.device)  # [L] outputs too
        self.y_var = torch.ones(L, device=self.device)  # [L] variance of normalized outputs (loss weights)
        self.step = 0
        self._resampled_since_log = 0
        self._last_ckpt_time = time.monotonic()
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ start
    @torch.no_grad()
    def initialize(self) -> None:
        """Fresh start: normalization scalars, output variances and JumpReLU thresholds from data."""
        cfg, L, D = self.cfg, self.source.n_layers, self.source.d_model
        # a share reads its part of norm_tokens (and of the threshold rows); the sums are added over data ranks
        W = self.dist.dp_size if self.source_share else 1
        norm_tokens, first_rows = max(1, cfg.norm_tokens // W), 4096 // W
        size = min(cfg.batch_size, max(W, cfg.norm_tokens // W * W))
        try:
            batches = self.source.batches(size, seed=cfg.seed + 7919, track=False)
        except TypeError:  # a source without the track option
            batches = self.source.batches(size, seed=cfg.seed + 7919)
        sx = torch.zeros(L, dtype=torch.float64)
        sy = torch.zeros(L, dtype=torch.float64)
        my = torch.zeros(L, D, dtype=torch.float64)
        first_x, seen = [], 0
        # closing the side pass frees its shuffle buffer (GBs) now, not at some later garbage collection
        with contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext():
            for x, y in batches:
                x, y = x[: norm_tokens - seen].cpu().double(), y[: norm_tokens - seen].cpu().double()
                sx += x.pow(2).sum((0, 2))
                sy += y.pow(2).sum((0, 2))
                my += y.sum(0)
                if seen < first_rows:
                    first_x.append(x[: first_rows - seen].float())
                seen += len(x)
                if seen >= norm_tokens:
                    break
        if self.source_share:  # every data rank gets the statistics of the union of the shares' rows
            seen_t = self.dist.sum_over_data(torch.tensor([float(seen)], dtype=torch.float64))
            for t in (sx, sy, my):
                self.dist.sum_over_data(t)
            seen = int(seen_t.item())
            first_x = [self.dist.gather_over_data(torch.cat(first_x))]
        if seen == 0:
            raise CltraceError("the activation source gave no rows: is the corpus empty?")
        x_scale = (sx / (seen * D)).sqrt()
        y_scale = (sy / (seen * D)).sqrt()
        x_scale, y_scale = torch.where(x_scale > 0, x_scale, 1.0), torch.where(y_scale > 0, y_scale, 1.0)
        mean_y = my / seen  # [L, D] raw
        var = (sy / seen - mean_y.pow(2).sum(-1)) / y_scale.pow(2)  # E‖y − ȳ‖² in normalized units
        self.x_scale.copy_(x_scale.float())
        self.y_scale.copy_(y_scale.float())
        self.y_var.copy_(var.clamp_min(1e-6 * D).float())
        self.tc.b_dec.copy_((mean_y / y_scale[:, None]).float())  # start from the mean output: NMSE ≤ 1 at once
        if cfg.init == "zero_decoder":  # the reconstruction starts at exactly b_dec; features begin to write once
            for s in range(L):          # the encoder's gradient reaches them through the decoder's first steps
                self.tc.W_dec[s].zero_()
        if cfg.activation in ("jumprelu", "batchtopk"):
            self._init_thresholds(torch.cat(first_x).to(self.device) / self.x_scale[:, None])

    @torch.no_grad()
    def _init_thresholds(self, x: Tensor) -> None:
        """θ per feature = the pre-activation it exceeds on init_l0/F of the tokens: a realistic L0 at once."""
        cfg = self.cfg
        pre = self.tc.pre_acts(x)  # [n, L, F]
        target = cfg.k if cfg.activation == "batchtopk" else cfg.init_l0
        k = max(1, min(pre.shape[0], round(pre.shape[0] * target / cfg.features_per_layer)))
        theta = pre.topk(k, dim=0).values[-1]  # [L, F]
        self.tc.log_threshold.copy_(theta.clamp_min(1e-3).log())

    def resume_from(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        tc_state = {k[3:]: v for k, v in tensors.items() if k.startswith("tc.")}
        self.tc.load_state_dict(tc_state)
        self.opt.load_flat(tensors, meta["optimizer"])
        self.stats.load(tensors)
        self.x_scale.copy_(tensors["norm.x_scale"])
        self.y_scale.copy_(tensors["norm.y_scale"])
        self.y_var.copy_(tensors["norm.y_var"])
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available() and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step = int(meta["step"])
        src_state = meta.get("source")
        if self.source_share:  # a share resumes from its own state
            shares = meta.get("source_shares") or []
            if len(shares) != self.dist.dp_size:
                raise CltraceError(f"{path} holds the source positions of {len(shares)} data ranks, this run has "
                                   f"{self.dist.dp_size}: resume with the same world size and feature_shards")
            src_state = shares[self.dist.dp_rank]
        if src_state is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(src_state)
            self._skip_batches = 0
        else:  # a source without state: replay its batches (cheap only for in-memory and cached sources)
            self._skip_batches = self.step
        self.last_checkpoint = path

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        src_state = self.source.state_dict() if hasattr(self.source, "state_dict") else None
        # every data rank's position in its own share (a collective: every rank calls save_checkpoint)
        shares = self.dist.gather_objects_over_data(src_state) if self.source_share else None
        if not (self.dist.is_main or (self.dist.writes_shard and self.dist.fp_size > 1)):
            return None
        tensors = {f"tc.{k}": v for k, v in self.tc.state_dict().items()}
        opt_tensors, opt_meta = self.opt.state_to_flat()
        tensors.update(opt_tensors)
        tensors.update(self.stats.state())
        tensors.update({"norm.x_scale": self.x_scale, "norm.y_scale": self.y_scale, "norm.y_var": self.y_var,
                        "rng.torch": torch.get_rng_state()})
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        meta = {"optimizer": opt_meta, "tokens": self.step * self.cfg.batch_size, "config": self.cfg.to_dict(),
                "source": src_state, "model_name": self.model_name}
        if shares is not None:
            meta["source_shares"] = shares
        root = checkpoint_dir(self.out, self.dist)
        self.last_checkpoint = save_checkpoint(root, self.step, tensors, meta, keep=self.cfg.keep_checkpoints)
        self._last_ckpt_time = time.monotonic()
        return self.last_checkpoint

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, x: Tensor, y: Tensor) -> dict:
        """One optimizer step on raw activations x, y [N, L, D]; returns the step's metrics."""
        cfg, tc, d = self.cfg, self.tc, self.dist
        if not self.source_share:  # a whole-stream source: keep this data rank's rows of the global batch
            x, y = d.split_batch(x, y)
        x = self._normalized(x, self.x_scale)
        y = self._normalized(y, self.y_scale)
        lr = cfg.lr * lr_factor(self.step, cfg.steps, cfg.warmup, cfg.decay, cfg.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        lam = cfg.sparsity * sparsity_factor(self.step, cfg.steps, cfg.sparsity_warmup)

        with self._autocast():
            fwd = sharded_forward(tc, x, d, sparse=cfg.sparse_decode)
        pre, recon = fwd.pre, fwd.recon  # [N, L, F], [N, L, D]
        recon_loss, nmse = reconstruction_loss(recon, y, self.y_var)
        terms = {"recon": recon_loss}
        if cfg.activation in ("jumprelu", "relu"):
            norms = tc.decoder_norms()  # [L, F] ‖W_dec_i‖ over all the layers feature i writes to
            if lam > 0:
                terms["sparsity"] = lam * d.sum_over_features(tanh_sparsity(fwd.acts, norms, cfg.sparsity_c))
            if cfg.preact > 0 and cfg.activation == "jumprelu":
                terms["preact"] = cfg.preact * d.sum_over_features(preact_loss(pre, tc.threshold, norms))
        elif cfg.auxk > 0:
            dead = self.stats.dead(cfg.dead_tokens)
            if d.reduce_over_features(dead.any().float(), "max") > 0:  # every shard takes the same branch
                aux = sharded_auxk_acts(pre, dead, cfg.auxk_k or 2 * cfg.k, d)  # [N, L, F]
                # on the listed path pre has no history: the encoder's gradient goes through a listing too
                aux_part = (tc.decode_features(aux, sparse=True) if fwd.listing is None
                            else tc.decode_from_pre(x, pre, aux != 0)[0])
                aux_recon = d.sum_over_features(aux_part)  # [N, L, D] no bias
                terms["auxk"] = cfg.auxk * auxk_loss(aux_recon, (y - recon).detach(), self.y_var)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            self._diverged("loss", loss, terms)

        self.opt.zero_grad()
        loss.backward()
        d.average_gradients(self.params)
        # the whole model's gradient norm (summed over feature shards, b_dec/W_skip counted once); clip if > 0
        gnorm = d.clip_grad_norm(self.params, cfg.grad_clip, shared=shared_parameters(tc))
        if not torch.isfinite(gnorm):
            self._diverged("gradient norm", gnorm, terms)
        self.opt.step()

        with torch.no_grad():
            if cfg.activation == "batchtopk":
                self._update_batchtopk_threshold(fwd)
            l0 = d.reduce_over_features(self.stats.update(fwd))  # [L] summed over feature shards
        self.step += 1
        if (cfg.resample_every and self.step % cfg.resample_every == 0
                and self.step <= cfg.resample_until * cfg.steps):
            self._resample(x, y, recon)
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "nmse_layers": nmse, "l0_layers": l0,
                "lr": lr, "lambda": lam, "grad_norm": gnorm.item()}

    @torch.no_grad()
    def _resample(self, x: Tensor, y: Tensor, recon: Tensor) -> int:
        """Re-initialize the features dead for `dead_tokens` tokens (training/resample.py); returns how many."""
        dead = self.stats.dead(self.cfg.dead_tokens)
        if not dead.any():
            return 0
        counts = resample_dead(self.tc, self.opt, self.stats, dead, x, token_errors(recon, y),
                               resample_generator(self.cfg.seed, self.step))
        self._resampled_since_log += int(counts.sum())
        return int(counts.sum())

    def _normalized(self, t: Tensor, scale: Tensor) -> Tensor:
        """Raw rows [N, L, D] -> t / scale[l], float32 on the device, laid out layer-major ([L, N, D] in memory)
        as the encoder's batched matmul reads it and the sparse decode writes its output: every [N, L, D]
        operation of the step then meets one memory layout (mixed layouts made them 2-3x slower on a CPU)."""
        N, L, D = t.shape
        out = torch.empty(L, N, D, device=self.device, dtype=torch.float32)
        torch.div(t.to(self.device).transpose(0, 1), scale[:, None, None], out=out)
        return out.transpose(0, 1)

    @torch.no_grad()
    def _update_batchtopk_threshold(self, fwd, decay: float = 0.99) -> None:
        """Inference threshold of BatchTopK: running mean of the smallest kept activation, per layer.

        The mean is bias-corrected (as Adam's moments): it starts from zero, not from the JumpReLU init
        threshold, so after t steps it is the average of t observed cut-offs, and inference keeps about k
        features per token however short the run. `step` (restored on resume) recovers the raw mean.
        """
        if fwd.listing is not None:  # the smallest listed activation of each layer
            pos = fwd.vals.new_full((self.tc.n_layers,), torch.inf)
            pos.scatter_reduce_(0, fwd.listing.lay, fwd.vals, "amin")
        else:
            pos = torch.where(fwd.acts > 0, fwd.acts, torch.inf).amin(dim=(0, 2))  # [L]
        pos = self.dist.reduce_over_features(pos, "min")  # every shard keeps the same per-layer threshold
        ok = torch.isfinite(pos)
        theta = self.dist.from_first_shard(self.tc.log_threshold.exp()[:, 0])  # feature 0 of the whole layer
        t = self.step + 1  # this update's index (1-based)
        raw = theta * (1 - decay ** (t - 1))  # the uncorrected running mean before this update
        new = torch.where(ok, (decay * raw + (1 - decay) * pos) / (1 - decay**t), theta)
        self.tc.log_threshold.copy_(new.clamp_min(1e-6).log()[:, None].expand_as(self.tc.log_threshold))

    def _diverged(self, what: str, value: Tensor, terms: dict) -> None:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        where = (f"the last good checkpoint is {self.last_checkpoint} (step {self._ckpt_step()}); resume from it "
                 "(resume=True) after lowering lr" if self.last_checkpoint else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"training stopped at step {self.step}: the {what} became {value.item()} ({parts}); {where}"
        )

    def _ckpt_step(self) -> int:
        return int(self.last_checkpoint.name.split("-")[-1]) if self.last_checkpoint else 0

    # ------------------------------------------------------------------ the loop
    def run(self, *, until_step: int | None = None) -> dict:
        """Train to the configured token count (or `until_step`, for tests); returns the last metrics. A fresh
        run with a time budget (cfg.train_seconds) moves that count to end on time (`_retime`)."""
        cfg, d = self.cfg, self.dist
        total = cfg.steps if until_step is None else min(until_step, cfg.steps)
        retime_at = ([max(1, int(f * cfg.steps)) for f in RETIME_AT]
                     if cfg.train_seconds > 0 and self.step == 0 and not d.distributed else [])
        t_start = time.monotonic()
        batches = self.source.batches(cfg.batch_size, seed=cfg.seed)
        for _ in range(getattr(self, "_skip_batches", 0)):
            next(batches)
        self._skip_batches = 0
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        log_file = MetricsLog(self.out / METRICS_FILE, enabled=d.is_main,
                              resume_step=self.step if self.step > 0 else None)
        bar = _progress(cfg, d, self.step, total)
        t_last, tok_last, last = time.monotonic(), self.step * cfg.batch_size, {}
        try:
            while self.step < total:
                x, y = next(batches)
                m = self.train_step(x, y)
                if retime_at and retime_at[0] <= self.step < total:  # (a run at its last step just ends)
                    retime_at.pop(0)
                    cfg = self._retime(time.monotonic() - t_start)
                    total = cfg.steps if until_step is None else min(until_step, cfg.steps)
                    if bar is not None:
                        bar.total = total * cfg.batch_size
                tokens = self.step * cfg.batch_size
                if bar is not None:
                    bar.update(cfg.batch_size)
                    bar.set_postfix(loss=f"{m['loss']:.3g}", nmse=f"{m['nmse_layers'].mean():.3f}",
                                    l0=f"{m['l0_layers'].mean():.1f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == total:
                    now = time.monotonic()
                    last = self._record(m, tokens, (tokens - tok_last) / max(now - t_last, 1e-9))
                    log_file.write(last)
                    t_last, tok_last = now, tokens
                due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                late = cfg.checkpoint_minutes and time.monotonic() - self._last_ckpt_time > 60 * cfg.checkpoint_minutes
                if d.distributed:  # all ranks must checkpoint the same steps: agree, at log steps only
                    late = self.step % cfg.log_every == 0 and d.any(late)
                if (due or late) and self.step < cfg.steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if hasattr(batches, "close"):
                batches.close()  # frees the shuffle buffer now (the source's state was recorded per batch)
        if self.step >= cfg.steps:
            self.save_checkpoint()
        return last

    def _retime(self, elapsed_s: float) -> TrainConfig:
        """Move the run's token count so that training ends cfg.train_seconds after it began, at the step rate
        measured so far. Why: the planner's rate comes from a few steps on random rows and was 14% under a real
        run's (a 2-hour run ended 12 minutes before its plan, after 1 h 35 min). The LR schedule follows (at 5%
        of the steps the cosine factor moves by under 0.001). The new count is saved in the run's config and
        checkpoints, so a resumed run continues it (and does not retime: its clock restarted)."""
        old = self.cfg.steps
        steps = retimed_steps(self.step, elapsed_s, self.cfg.train_seconds)
        record = {"step": self.step, "elapsed_s": round(elapsed_s, 1), "steps": steps}
        # the buffer the stream was opened with is pinned: a default one follows `tokens`, and a resumed run must
        # open the same stream (a cached source ignores it)
        buffer = stream_buffer_tokens(self.cfg, self.source.n_layers, self.source.d_model)
        self.cfg = dataclasses.replace(self.cfg, tokens=steps * self.cfg.batch_size, shuffle_buffer=buffer, extra={
            **self.cfg.extra, "retimed": [*self.cfg.extra.get("retimed", []), record]})
        if self.dist.is_main:
            self.cfg.save(self.out / CONFIG_FILE)
        self.log(f"retimed at step {self.step} ({elapsed_s:.0f} s): {old} -> {steps} steps to end "
                 f"{self.cfg.train_seconds:.0f} s after training began")
        return self.cfg

    def _record(self, m: dict, tokens: int, tok_per_s: float) -> dict:
        dead = self.stats.dead(min(self.cfg.dead_tokens, max(tokens, 1)))
        dense = self.stats.frequency > self.cfg.dense_frequency
        rec = {
            "step": self.step, "tokens": tokens, "tok_per_s": round(tok_per_s, 1),
            **{k: m[k] for k in ("loss", "recon", "sparsity", "preact", "auxk") if k in m},
            "nmse": m["nmse_layers"].mean().item(), "l0": m["l0_layers"].mean().item(),
            "dead_fraction": dead.float().mean().item(), "dense_fraction": dense.float().mean().item(),
            "lr": m["lr"], "lambda": m["lambda"], "grad_norm": m["grad_norm"],
            "resampled": self._resampled_since_log,  # features re-initialized since the previous line
            "nmse_layers": [round(v, 5) for v in m["nmse_layers"].tolist()],
            "l0_layers": [round(v, 2) for v in m["l0_layers"].tolist()],
        }
        self._resampled_since_log = 0
        self.log(f"step {self.step}: loss {rec['loss']:.4g} nmse {rec['nmse']:.4f} L0 {rec['l0']:.1f} "
                 f"dead {rec['dead_fraction']:.3f} {tok_per_s:.0f} tok/s")
        return rec

    # ------------------------------------------------------------------ the result
    def finalize(self, last: dict | None = None) -> Transcoder:
        """Fold the normalization into a copy of the transcoder, save it, plot the curves."""
        cfg = self.cfg
        tc = Transcoder(self.tc.cfg, device=self.device, init=False)
        tc.load_state_dict(self.tc.state_dict())
        tc.fold_normalization(self.x_scale, self.y_scale)
        tc.eval()
        tc.cfg.extra = {**tc.cfg.extra, "training": {
            "tokens": self.step * cfg.batch_size, "steps": self.step, "config": CONFIG_FILE,
            "final_nmse": (last or {}).get("nmse"), "final_l0": (last or {}).get("l0"), **cfg.extra,
        }}
        if self.dist.fp_size > 1 and self.dist.writes_shard:  # shard files + shards.json: merge-shards joins them
            save_shard(tc, self.out)
        if self.dist.is_main:
            if self.dist.fp_size == 1:
                save_transcoder(tc, self.out)
            if (self.out / METRICS_FILE).exists():
                try:
                    plot_curves(self.out / METRICS_FILE, self.out / CURVES_FILE,
                                f"{cfg.kind.upper()} {cfg.activation}, F={cfg.features_per_layer}, {self.model_name}")
                except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a trained transcoder
                    self.log(f"could not plot the training curves: {e}")
        return tc


def _progress(cfg: TrainConfig, d, step: int, total: int):
    if not cfg.progress or not d.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
                desc=f"train {cfg.kind}", dynamic_ncols=True, smoothing=0.1)


# ---------------------------------------------------------------------- the entry point
def stream_buffer_tokens(cfg: TrainConfig, n_layers: int, d_model: int) -> int:
    """Rows of the shuffle buffer when streaming: cfg.shuffle_buffer, else what the run needs (a short run needs
    no 2 GB buffer: filling it would cost more model passes than the run itself)."""
    return cfg.shuffle_buffer or min(default_buffer_tokens(n_layers, d_model),
                                     max(cfg.tokens, cfg.norm_tokens, 8 * cfg.batch_size))


def open_source(cfg: TrainConfig, *, device=None, model=None, dist=None):
    """(activation source, model name) for a config: an activation cache or activations streamed from the model.

    dist: under data parallelism, the source is this data rank's share (rank dp_rank of dp_size): no two
    data ranks read the same rows or run the model on the same contexts.
    """
    share = {"rank": dist.dp_rank, "world": dist.dp_size} if dist is not None and dist.dp_size > 1 else {}
    if cfg.cache:
        if not Path(cfg.cache).exists():
            raise SettingError(f"no activation cache at {cfg.cache}: write one first (or leave cache unset to stream "
                               "activations from the model)", ("cache",))
        name = model.name if model is not None else (display_name(cfg.model) if cfg.model else None)
        src = CachedActivations(cfg.cache, model=name, **share)
        return src, src.manifest["model"]
    if model is None:
        model = load_model(cfg.model or DEFAULT_MODEL, device=device or "cpu")
    buffer = stream_buffer_tokens(cfg, model.n_layers, model.d_model)
    src = StreamingActivations(model, cfg.corpus or None, context_len=cfg.context_len, buffer_tokens=buffer,
                               precision=cfg.collect_precision, **share)
    return src, model.name


def train(cfg: TrainConfig, *, source=None, model=None, model_name: str = "", resume: bool = False, dist=None,
          log=None, until_step: int | None = None) -> Transcoder:
    """Train a transcoder as `cfg` says and save it into cfg.out; returns it (acting on raw activations).

    source: any activation source (default: cfg.cache, else activations streamed from cfg.model).
    resume: continue from the newest checkpoint in cfg.out (same result as an uninterrupted run); with no
    checkpoint there, start afresh. until_step: stop early after that step (tests, benchmarks).
    """
    cfg.validate()
    own_group = dist is None  # under torchrun: join its process group here, and leave it when done
    if own_group:
        dist = init_distributed(cfg.feature_shards, cfg.device)
    try:
        return _train(cfg, dist, source=source, model=model, model_name=model_name, resume=resume, log=log,
                      until_step=until_step)
    finally:  # a process group left alive aborts the process at exit (gloo threads still running)
        if own_group:
            shutdown(dist)


def _train(cfg: TrainConfig, dist, *, source, model, model_name: str, resume: bool, log,
           until_step: int | None) -> Transcoder:
    out = Path(cfg.out)
    ckpt = find_resume_checkpoint(out, dist)
    if ckpt is not None and not resume:
        raise SettingError(f"{out} already holds a training run (checkpoint {ckpt.name}): resume it (resume=True) "
                           "or choose another output folder", ("resume", "out"))
    if ckpt is not None:
        _check_same_config(cfg, out / CONFIG_FILE)
    if source is None:
        source, model_name = open_source(cfg, device=resolve_device(cfg.device), model=model, dist=dist)
    model_name = model_name or getattr(model, "name", "") or cfg.model
    trainer = Trainer(cfg, source, model_name=model_name, dist=dist, log=log if dist.is_main else None)
    out.mkdir(parents=True, exist_ok=True)
    with FailureGuard(dist):  # a failure on any rank stops every rank with that rank's message
        if ckpt is not None:
            trainer.resume_from(ckpt)
            trainer.log(f"resuming from {ckpt} (step {trainer.step} of {cfg.steps})")
        else:
            if trainer.dist.is_main:
                cfg.save(out / CONFIG_FILE)
            trainer.initialize()
        last = trainer.run(until_step=until_step)
    if trainer.step < trainer.cfg.steps:  # the trainer's: a time budget may have moved the count
        return trainer.tc
    return trainer.finalize(last)


def _check_same_config(cfg: TrainConfig, saved_path: Path) -> None:
    if not saved_path.exists():
        return
    saved = TrainConfig.load(saved_path)
    diff = [f"{k}: saved {getattr(saved, k)!r}, now {getattr(cfg, k)!r}"
            for k in cfg.to_dict() if k not in RUNTIME_FIELDS and cfg.to_dict()[k] != saved.to_dict()[k]]
    if diff:
        raise CltraceError("cannot resume with a different training config (" + "; ".join(diff) + ")")

