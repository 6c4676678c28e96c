"""What to change: `Intervention`s, read from `LAYER:FEATURE[@POS]=VALUE` and checked against the model.

Checking happens here, once, so the engine can index tensors without guarding every access: an unknown
layer or feature, a position past the prompt or a non-finite value becomes a one-line `CltraceError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from torch import Tensor

from cltrace.errors import CltraceError

OPS = ("set", "scale")
_SPEC = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*(?:@\s*(-?\d+)\s*)?(?:=\s*(\S+)\s*)?$")
_NODE = re.compile(r"^\s*(\d+)_(\d+)_(\d+)\s*(?:=\s*(\S+)\s*)?$")  # a graph's feature node id "L_F_P"


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Change one transcoder feature: `set` its activation to `value`, or `scale` it by `value`.

    Keyword-only, in the (layer, pos, feature) order used for features everywhere (graphs, node ids, JSON):
    `Intervention(layer=3, pos=8, feature=1205, value=0.0)`. pos None means every position but 0 (BOS has
    no features), including tokens generated later; an int is one prompt position (≥ 1, or negative from the
    end). `value` may be a 0-dim tensor that requires grad: the engine then differentiates through it.
    """

    layer: int
    pos: int | None = None
    feature: int
    value: float | Tensor
    op: str = "set"  # "set" or "scale"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "pos": self.pos, "feature": self.feature, "op": self.op,
                "value": float(self.value)}


@dataclass(frozen=True, kw_only=True)
class FeatureRef:
    """A feature to watch: (layer, pos, feature), at every position when pos is None."""

    layer: int
    pos: int | None = None
    feature: int


def parse_feature(text: str, *, what: str = "feature") -> tuple[int, int | None, int, str | None]:
    """'L:F[@P][=V]', or a graph node id 'L_F_P[=V]' -> (layer, pos or None, feature, value text or None)."""
    m = _SPEC.match(text) or _NODE.match(text)
    if not m:
        hint = " (only feature nodes can be changed)" if re.search(r"_err_|^E_", text) else ""
        raise CltraceError(
            f"cannot read {what} {text!r}{hint}: write LAYER:FEATURE[@POS]=VALUE, e.g. 3:1205@8=0 or 3:1205=-2, "
            "or a graph's feature node id LAYER_FEATURE_POS=VALUE"
        )
    layer, feature, pos, value = m.groups()
    return int(layer), None if pos is None else int(pos), int(feature), value


def parse_intervention(text: str, op: str = "set") -> Intervention:
    """'3:1205@8=0' -> Intervention(layer=3, pos=8, feature=1205, value=0.0, op=op)."""
    layer, pos, feature, value = parse_feature(text, what=f"{op} intervention")
    if value is None:
        raise CltraceError(f"{op} intervention {text!r} has no value: add =VALUE, e.g. {text}=0")
    try:
        v = float(value)
    except ValueError:
        raise CltraceError(f"{op} intervention {text!r}: {value!r} is not a number") from None
    return Intervention(layer=layer, pos=pos, feature=feature, value=v, op=op)


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """'A:B' -> [A, .., B-1]; 'all' or ':' -> every layer; 'A' -> [A]; None or '' -> none."""
    if text is None or text.strip() in ("", "none"):
        return []
    t = text.strip()
    if t in ("all", ":"):
        return list(range(n_layers))
    try:
        if ":" in t:
            a, b = t.split(":", 1)
            lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else n_layers
        else:
            lo = int(t)
            hi = lo + 1
    except ValueError:
        raise CltraceError(f"cannot read layers {text!r}: write A:B (layers A..B-1), A, or all") from None
    if not (0 <= lo < hi <= n_layers):
        raise CltraceError(f"layers {text!r} are outside 0..{n_layers - 1} or empty (A:B means A..B-1)")
    return list(range(lo, hi))


def check_feature(layer: int, pos: int | None, feature: int, n_layers: int, n_features: int,
                  n_pos: int, label: str) -> int | None:
    """Raise for a layer, feature or position that does not exist; return pos made non-negative."""
    if not 0 <= layer < n_layers:
        raise CltraceError(f"{label}: layer {layer} does not exist (the transcoder has layers 0..{n_layers - 1})")
    if not 0 <= feature < n_features:
        raise CltraceError(
            f"{label}: feature {feature} does not exist (each layer has {n_features} features, 0..{n_features - 1})"
        )
    if pos is None:
        return None
    p = pos + n_pos if pos < 0 else pos
    if not 0 <= p < n_pos:
        raise CltraceError(f"{label}: position {pos} is past the prompt ({n_pos} tokens, positions 0..{n_pos - 1})")
    if p == 0:
        raise CltraceError(f"{label}: position 0 is the start-of-text token, which carries no features "
                           f"(as in attribution graphs); use positions 1..{n_pos - 1}")
    return p


def validate(interventions: list[Intervention], tc, n_pos: int) -> list[Intervention]:
    """Check every intervention against the transcoder and the prompt length; resolve negative positions."""
    out = []
    for iv in interventions:
        label = f"{iv.op} {iv.layer}:{iv.feature}" + ("" if iv.pos is None else f"@{iv.pos}")
        if iv.op not in OPS:
            raise CltraceError(f"{label}: unknown operation {iv.op!r}, use one of {', '.join(OPS)}")
        if not math.isfinite(float(iv.value)):
            raise CltraceError(f"{label}: value {float(iv.value)} is not a finite number")
        pos = check_feature(iv.layer, iv.pos, iv.feature, tc.n_layers, tc.n_features, n_pos, label)
        out.append(replace(iv, pos=pos))
    return out


def validate_refs(refs: list[FeatureRef], tc, n_pos: int) -> list[FeatureRef]:
    return [
        replace(r, pos=check_feature(r.layer, r.pos, r.feature, tc.n_layers, tc.n_features, n_pos,
                                     f"watch {r.layer}:{r.feature}"))
        for r in refs
    ]
