"""Training configuration: one plain dataclass whose fields document themselves.

Saved beside the checkpoint and the final transcoder as `train_config.yaml`; loadable from YAML or TOML;
any field can be overridden from the command line (`--set name=value`, or the named flags of `cltrace train`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cltrace.errors import CltraceError, SettingError

CONFIG_FILE = "train_config.yaml"


# the fields that take one of a few names, and those names
CHOICES: dict[str, tuple[str, ...]] = {
    "decay": ("cosine", "linear", "constant"),
    "precision": ("fp32", "bf16"),
    "collect_precision": ("fp32", "bf16"),
    "init": ("paper", "zero_decoder"),
    "sparse_decode": ("auto", "always", "never"),
}


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ what to train
    model: str = ""  # model spec (built-in name, folder, .gguf, hub id); "" = gemma-3-270m, or the cache's model
    kind: str = "clt"  # "clt" (cross-layer) or "plt" (per-layer transcoder)
    features_per_layer: int = 2048  # F
    activation: str = "jumprelu"  # jumprelu | topk | batchtopk | relu
    k: int = 0  # active features per token and layer for topk / batchtopk
    skip: bool = False  # add a linear skip term x @ W_skip (PLT "skip transcoder")
    # ------------------------------------------------------------------ data
    corpus: str = ""  # corpus spec for streaming activations ("" = the default committed corpus)
    cache: str = ""  # folder of cached activations: train from disk instead of running the model
    context_len: int = 128  # tokens per sequence when streaming
    collect_precision: str = "fp32"  # fp32 | bf16: the model's matmuls when collecting activations (bf16 autocast:
    #                                  3.3x faster on an AVX512-BF16 CPU, rows within 2.5% of fp32's; the recipe's
    #                                  choice where bf16 is native, runtime.fast_bf16)
    tokens: int = 1_000_000  # training tokens in total
    train_seconds: float = 0.0  # a time budget's training time (set by --minutes; 0 = none): a fresh one-process
    #                            run measures its step rate at 5% and 50% of its steps and moves `tokens` to end on time
    batch_size: int = 4096  # tokens per optimizer step (large: amortizes the optimizer over many tokens)
    shuffle_buffer: int = 0  # rows held for shuffling when streaming (0 = the source's default, ~2 GB)
    norm_tokens: int = 8192  # tokens used to estimate the per-layer normalization scalars and variances
    # ------------------------------------------------------------------ optimizer and schedules
    lr: float = 1e-3  # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: float = 0.05  # LR warmup, as a fraction of the steps
    decay: str = "cosine"  # LR decay after warmup: cosine | linear | constant
    min_lr: float = 0.1  # final LR as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # ------------------------------------------------------------------ sparsity (jumprelu / relu)
    sparsity: float = 1e-3  # λ of λ Σ_i tanh(c · ‖W_dec_i‖ · a_i), summed over features and layers
    sparsity_c: float = 1.0  # c of the tanh penalty
    sparsity_warmup: float = 1.0  # λ ramps linearly from 0 over this fraction of the steps
    preact: float = 3e-6  # pre-activation penalty Σ relu(θ − pre)·‖W_dec_i‖ against dead features (0 = off)
    bandwidth: float = 0.1  # JumpReLU straight-through kernel width, in normalized units
    init_l0: int = 64  # threshold init: each feature fires on init_l0/F of the first batch's tokens
    init: str = "paper"  # paper: encoder U(±1/√F), decoder U(±1/√(n_out·D)) (Ameisen et al.); zero_decoder: the same
    #                      encoder, decoder 0 (sparsify's transcoder init: the reconstruction starts at b_dec, no noise)
    # ------------------------------------------------------------------ topk / batchtopk
    auxk: float = 0.0  # coefficient of the AuxK dead-feature loss (0 = off; 1/32 is customary)
    auxk_k: int = 0  # features the AuxK loss revives per token and layer (0 = 2·k)
    resample_every: int = 0  # steps between re-initializations of the dead features (0 = off; training/resample.py)
    resample_until: float = 0.8  # no resampling after this fraction of the steps (a late one could not learn)
    # ------------------------------------------------------------------ bookkeeping
    dead_tokens: int = 1_000_000  # a feature is dead when it has not fired for this many tokens (AuxK, resampling)
    dense_frequency: float = 0.1  # a feature is dense when it fires on more than this fraction of tokens
    sparse_decode: str = "auto"  # auto | always | never: decode only the active features (auto: when ≤5% fire;
    #                              dense on a GPU under bf16, where tensor cores win)
    # ------------------------------------------------------------------ runtime
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 (autocast for the matmuls; weights and optimizer stay fp32)
    seed: int = 0
    feature_shards: int = 1  # split every layer's features over this many processes (torchrun); resume with the same
    out: str = "runs/transcoder"  # output folder: transcoder, config, metrics, checkpoints, curves
    log_every: int = 10  # steps between metric lines in metrics.jsonl
    checkpoint_every: int = 100  # steps between checkpoints (0 = only at the end)
    checkpoint_minutes: float = 30.0  # also checkpoint when this much time has passed (0 = off)
    keep_checkpoints: int = 1  # how many recent checkpoints to keep
    progress: bool = True  # show a tqdm progress bar
    extra: dict = field(default_factory=dict)  # free-form notes copied into the transcoder's provenance

    # ------------------------------------------------------------------ derived
    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def validate(self) -> None:
        def bad(msg: str):
            raise CltraceError(f"bad training config: {msg}")

        if self.kind not in ("clt", "plt"):
            bad(f"kind must be clt or plt, not {self.kind!r}")
        if self.activation not in ("jumprelu", "topk", "batchtopk", "relu"):
            bad(f"activation must be jumprelu, topk, batchtopk or relu, not {self.activation!r}")
        if self.activation in ("topk", "batchtopk") and self.k <= 0:
            raise SettingError(f"bad training config: activation {self.activation} needs k > 0 (active features "
                               "per token and layer)", ("activation", "k"))
        if self.features_per_layer <= 0 or self.tokens <= 0 or self.batch_size <= 0:
            bad("features_per_layer, tokens and batch_size must be positive")
        if self.tokens < self.batch_size:
            bad(f"tokens ({self.tokens}) must be at least batch_size ({self.batch_size})")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                bad(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {getattr(self, name)!r}")
        if self.lr <= 0:
            bad("lr must be positive")
        if not self.train_seconds >= 0:  # (NaN too)
            bad(f"train_seconds must be 0 (no time budget) or positive, not {self.train_seconds}")
        if self.resample_every < 0:
            bad("resample_every must be 0 (off) or a number of steps")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read YAML (.yaml/.yml), TOML (.toml) or JSON (.json)."""
        path = Path(path)
        if not path.exists():
            raise CltraceError(f"no config file at {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise CltraceError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise CltraceError(f"config {path} must be a mapping of field: value")
        return cls().override(data)

    def override(self, values: dict) -> TrainConfig:
        """A copy with `values` (field name -> value, strings converted to the field's type) applied."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for name, value in values.items():
            key = name.replace("-", "_")
            if key not in known:
                raise CltraceError(f"unknown training option {name!r}; known: {', '.join(sorted(known))}")
            changes[key] = _convert(getattr(self, key), value, key)
        return dataclasses.replace(self, **changes)


def parse_assignments(items: list[str]) -> dict:
    """['lr=1e-3', 'kind=plt'] -> {'lr': '1e-3', 'kind': 'plt'}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise CltraceError(f"a setting is written name=value, not {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _convert(current, value, name: str):
    if not isinstance(value, str) or isinstance(current, str):
        if isinstance(current, tuple) and isinstance(value, list):
            return tuple(value)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(float(value)) if "e" in value.lower() else int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, (tuple, list, dict)):
            return type(current)(json.loads(value))
    except (ValueError, json.JSONDecodeError) as e:
        raise CltraceError(f"bad value {value!r} for {name} (expected {type(current).__name__})") from e
    return value
