"""Global weights: how one feature connects to every other across all contexts, not on one prompt.

    global_weights(tc, layer, feature, db=None, kind="virtual"|"era"|"twera", direction="upstream"|"downstream")

**Virtual weight** (the paper's residual-direct path). A feature i of layer s writes W_dec[s][i, l − s] into the
residual stream at the MLP output of layer l (a CLT: every l ≥ s; a PLT: l = s only). A feature j of layer t
reads layer t's MLP input, which the model computes from the residual stream *after* layer t's attention and
*before* its MLP (`reads`: "mlp_in", that stream through the pre-MLP norm, or "resid_mid", the stream itself).
What j reads therefore holds the writes into layers s .. t − 1, and not layer t's own MLP output, so

    V_ij = Σ_{l = s}^{t − 1} W_dec[s][i, l − s] · W_enc[t][:, j]          for t > s (only l < s + n_out(s))
    V_ij = 0                                                             for t ≤ s: no residual path

A same-layer pair (t = s) has no path even for a CLT: its write lands after its own layer's read point. For a
PLT, V_ij = W_dec[s][i, 0] · W_enc[t][:, j] for every t > s (the write stays in the stream). Attention, the
norms (the pre-MLP norm of an "mlp_in" reader: its 1/rms and its gain) and b_enc are left out, as in the paper.

**ERA and TWERA** correct V for interference with co-activation statistics of a feature database built with
`--coactivation M` (`FeatureDB.coactivation`; expectations over the tokens the pass measured):

    TWERA_ij = V_ij · E[a_i a_j] / E[a_j]          E[a_j] = frequency_j · mean_act_j (the features table)
    ERA_ij   = V_ij · E[1(a_j > 0) a_i]

The database keeps, per kept pair, E[a_i a_j] and the count of tokens where both fire, not Σ a_i over those
tokens, so ERA's weight is estimated as P(a_i > 0, a_j > 0) · E[a_i | a_i > 0]: exact when i's activation does
not depend on whether j fires. Pairs the bounded summary did not keep get estimate 0 and a bound. For every pair
`bound` bounds the true |value| (source i's summary error err_i, max_i its largest activation, θ_j j's JumpReLU
threshold, so a_j > θ_j where it fires), and an estimate beyond it is clipped to it:

    TWERA: |V_ij| · min((kept E[a_i a_j] + err_i) / E[a_j], max_i)
    ERA:   |V_ij| · min((kept E[a_i a_j] + err_i) / θ_j, E[a_i])       (E[a_i] alone without thresholds)

Rows are ranked by |value|; `rest_bound` bounds |value| of every pair not listed (for virtual weights, the
next |V| after the listed ones).

Cost: one [F, D] @ [D] product per (source layer, write layer) upstream, one [D] @ [D, F] per target layer
downstream; no F × F matrix is ever formed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.features.db import FeatureDB, sqlite_errors

KINDS = ("virtual", "era", "twera")
DIRECTIONS = ("upstream", "downstream")


@dataclass
class WeightRow:
    """One connection: the other feature, the kind's value, the virtual weight behind it."""

    layer: int
    feature: int
    value: float  # V, ERA or TWERA (the estimate; 0 for a pair the summary did not keep)
    virtual: float  # V_ij
    bound: float  # |true value| ≤ bound (= |value| for virtual weights)
    coact: float | None = None  # kept E[a_i a_j] (era, twera); None for virtual weights
    count: int | None = None  # tokens where both fired while the pair was kept (era, twera)
    label: str = ""
    label_source: str = ""

    @property
    def id(self) -> str:
        return f"{self.layer}:{self.feature}"


@dataclass
class GlobalWeights:
    """A feature's strongest global connections of one kind and direction."""

    layer: int
    feature: int
    kind: str
    direction: str  # "upstream": sources i that feed it (it is j); "downstream": targets j it feeds (it is i)
    rows: list[WeightRow]
    rest_bound: float  # |value| ≤ rest_bound for every pair not in rows
    candidates: int  # pairs considered: every feature of the reachable layers (virtual), the kept pairs (era, twera)
    tokens: int = 0  # tokens the co-activation expectations are over (era, twera)
    label: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for r in d["rows"]:
            r["id"] = f"{r['layer']}:{r['feature']}"
        return d


# ---------------------------------------------------------------------- virtual weights
def _check_feature(tc, layer: int, feature: int) -> None:
    if not (0 <= layer < tc.n_layers and 0 <= feature < tc.n_features):
        raise CltraceError(f"feature {layer}:{feature} is not in these transcoders ({tc.n_layers} layers × "
                           f"{tc.n_features} features, numbered from 0)")


def write_layers(tc, source: int, target: int) -> range:
    """The MLP-output layers where a source-layer feature writes and a target-layer feature reads: s .. t − 1
    (a PLT: s only), empty when target ≤ source."""
    return range(source, min(target, source + tc.n_out(source)))


@torch.no_grad()
def upstream_virtual(tc, layer: int, feature: int) -> Tensor:
    """V[s, i] from every source i of layers s < `layer` into target (layer, feature): [layer, F], float32."""
    _check_feature(tc, layer, feature)
    enc = tc.encoder(layer)[:, feature].float()  # [D] what the target reads
    out = torch.zeros(layer, tc.n_features, device=enc.device)
    for s in range(layer):
        dec = tc.decoder(s)  # [F, n_out, D] (one layer in memory at a time when lazy)
        for w in write_layers(tc, s, layer):
            out[s] += dec[:, w - s].float() @ enc  # [F, D] @ [D]
    return out


@torch.no_grad()
def downstream_virtual(tc, layer: int, feature: int) -> Tensor:
    """V[t − layer − 1, j] from source (layer, feature) into every target j of layers t > `layer`:
    [L − layer − 1, F], float32."""
    _check_feature(tc, layer, feature)
    # [n_out, D] its writes into layers layer .. layer + n_out − 1
    dec = tc.decoder_vectors(layer, torch.tensor([feature]))[0].float()
    written = torch.zeros(tc.d_model, device=dec.device)  # Σ of the writes a target at t reads
    out = torch.zeros(tc.n_layers - layer - 1, tc.n_features, device=dec.device)
    for t in range(layer + 1, tc.n_layers):
        w = t - 1  # the newest layer a target at t sees written
        if w - layer < dec.shape[0]:
            written += dec[w - layer]
        out[t - layer - 1] = written @ tc.encoder(t).float()  # [D] @ [D, F]
    return out


# ---------------------------------------------------------------------- statistics from the database
def _feature_stats(db: FeatureDB, L: int, F: int) -> dict[str, Tensor]:
    """[L, F] frequency, mean_act (when active), max_act, and the co-activation error of each source."""
    out = {k: torch.zeros(L, F, dtype=torch.float64) for k in ("frequency", "mean_act", "max_act", "error")}
    with sqlite_errors(db.path):
        feats = db.conn.execute("SELECT layer, feature, frequency, mean_act, max_act FROM features").fetchall()
        errs = db.conn.execute("SELECT layer, feature, error FROM coactivation_sources").fetchall()
    for rows, names in ((feats, ("frequency", "mean_act", "max_act")), (errs, ("error",))):
        if rows:
            t = torch.tensor(rows, dtype=torch.float64)  # [n, 2 + len(names)]
            at = (t[:, 0].long(), t[:, 1].long())
            for k, name in enumerate(names):
                out[name][at] = t[:, 2 + k]
    return out


def _kept_pairs(db: FeatureDB, layer: int, feature: int, direction: str) -> list[tuple[int, int, float, int]]:
    """(other layer, other feature, E[a_i a_j], count) of the kept pairs that can connect: sources in earlier
    layers (upstream, through the partner index) or targets in later layers (downstream)."""
    if direction == "upstream":
        q = ("SELECT layer, feature, mean_prod, count FROM coactivation WHERE partner_layer = ? AND "
             "partner_feature = ? AND layer < ?")
    else:
        q = ("SELECT partner_layer, partner_feature, mean_prod, count FROM coactivation WHERE layer = ? AND "
             "feature = ? AND partner_layer > ?")
    with sqlite_errors(db.path):
        return db.conn.execute(q, (layer, feature, layer)).fetchall()


def corrected(tc, db: FeatureDB, layer: int, feature: int, kind: str, direction: str,
              V: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ERA or TWERA of every pair on the grid of V ([n, F]: source layers 0.. upstream, target layers layer+1..
    downstream) -> (value, bound, kept mask, kept E[a_i a_j], kept count), all [n, F]."""
    L, F = tc.n_layers, tc.n_features
    st = _feature_stats(db, L, F)
    n = V.shape[0]
    first = 0 if direction == "upstream" else layer + 1  # the grid's first layer
    mp = torch.zeros(n, F, dtype=torch.float64)
    cnt = torch.zeros(n, F, dtype=torch.float64)
    kept = torch.zeros(n, F, dtype=torch.bool)
    for ol, of, m, c in _kept_pairs(db, layer, feature, direction):
        mp[ol - first, of], cnt[ol - first, of], kept[ol - first, of] = m, c, True
    grid = slice(first, first + n)
    me = (slice(layer, layer + 1), slice(feature, feature + 1))  # this feature, broadcast over the grid
    # where i's and j's statistics are: the grid ([n, F]) for the other side, this feature ([1, 1]) for its own
    src, tgt = ((grid, slice(None)), me) if direction == "upstream" else (me, (grid, slice(None)))
    err_i = st["error"][src]
    mean_i, max_i = st["mean_act"][src], st["max_act"][src]
    freq_i = st["frequency"][src]
    Ea_j = (st["frequency"] * st["mean_act"])[tgt]
    Vd = V.double().cpu()
    tokens = int(db.meta["coactivation"]["tokens"])
    if kind == "twera":
        safe = Ea_j.clamp_min(1e-300)
        value = torch.where(Ea_j > 0, Vd * mp / safe, torch.zeros(()))
        bound = torch.where(Ea_j > 0, Vd.abs() * torch.minimum((mp + err_i) / safe, max_i), torch.zeros(()))
    else:
        value = Vd * (cnt / max(tokens, 1)) * mean_i
        theta = tc.threshold.detach().double().cpu()[tgt]
        E_i = (freq_i * mean_i).expand_as(Vd)
        if tc.cfg.activation in ("jumprelu", "batchtopk"):  # a_j > θ_j where it fires
            by_theta = torch.where(theta > 0, (mp + err_i) / theta.clamp_min(1e-300), torch.full((), float("inf")))
            bound = Vd.abs() * torch.minimum(by_theta, E_i)
        else:
            bound = Vd.abs() * E_i
    # an estimate beyond the bound on the true value is wrong by at least the excess: clip it (ERA's estimate
    # assumes i's activation does not depend on j; TWERA's E[a_j] comes from all tokens, E[a_i a_j] maybe a sample)
    value = value.sign() * torch.minimum(value.abs(), bound)
    return value, bound, kept, mp, cnt


# ---------------------------------------------------------------------- the API
def global_weights(tc, layer: int, feature: int, db: FeatureDB | str | os.PathLike | None = None, *,
                   kind: str = "virtual", direction: str = "upstream", top: int = 20,
                   check: bool = True) -> GlobalWeights:
    """The `top` strongest global connections of feature (layer, feature), ranked by |value|, with labels from
    `db` when given (a FeatureDB or its path; `check` verifies it was built for `tc`). era and twera need a
    database built with co-activation (`cltrace features build --coactivation M`). See the module docstring
    for the definitions, the estimate of ERA and the bounds."""
    if kind not in KINDS:
        raise CltraceError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if direction not in DIRECTIONS:
        raise CltraceError(f"direction must be upstream or downstream, not {direction!r}")
    if top < 1:
        raise CltraceError(f"top must be at least 1, not {top}")
    _check_feature(tc, layer, feature)
    if kind != "virtual" and db is None:
        raise CltraceError(f"{kind} needs a feature database with co-activation statistics: pass --db FEATURES.db "
                           "(built with `cltrace features build --coactivation M`)")
    opened = db is not None and not isinstance(db, FeatureDB)
    if opened:
        db = FeatureDB.open(db)
    try:
        if db is not None and check:
            db.check_fits(tc)
        if kind != "virtual" and not db.meta.get("coactivation"):
            raise CltraceError(f"{db.path} has no co-activation statistics, which {kind} needs: rebuild it with "
                               "`cltrace features build ... --coactivation M` (e.g. M = 128)")
        return _rank(tc, db, layer, feature, kind, direction, top)
    finally:
        if opened:
            db.close()


def _rank(tc, db, layer, feature, kind, direction, top) -> GlobalWeights:
    V = (upstream_virtual if direction == "upstream" else downstream_virtual)(tc, layer, feature).cpu()
    first = 0 if direction == "upstream" else layer + 1
    F = tc.n_features
    notes = []
    if V.shape[0] == 0:
        notes.append("layer 0 has no earlier features to read from" if direction == "upstream"
                     else "the last layer has no later features to write to")
    if kind == "virtual":
        value = V.double()
        bound, kept = value.abs(), torch.ones_like(value, dtype=torch.bool)
        mp = cnt = None
        tokens = 0
    else:
        value, bound, kept, mp, cnt = corrected(tc, db, layer, feature, kind, direction, V)
        tokens = int(db.meta["coactivation"]["tokens"])
    score = torch.where(kept, value.abs(), torch.full((), -1.0, dtype=torch.float64)).reshape(-1)
    n_kept = int(kept.sum())
    order = score.argsort(descending=True, stable=True)[:min(top, n_kept)]
    listed = torch.zeros_like(score, dtype=torch.bool)
    listed[order] = True
    rest = bound.reshape(-1)[~listed]
    rest_bound = float(rest.max()) if rest.numel() else 0.0
    rows = []
    for g in order.tolist():
        r, f = divmod(g, F)
        rows.append(WeightRow(layer=first + r, feature=f, value=float(value[r, f]), virtual=float(V[r, f]),
                              bound=float(bound[r, f]), coact=None if mp is None else float(mp[r, f]),
                              count=None if cnt is None else int(cnt[r, f])))
    label = ""
    if db is not None:
        cards = db.features([(layer, feature)] + [(w.layer, w.feature) for w in rows], examples=False)
        label = cards[0].label
        for w, c in zip(rows, cards[1:]):
            w.label, w.label_source = c.label, c.label_source
    return GlobalWeights(layer=layer, feature=feature, kind=kind, direction=direction, rows=rows,
                         rest_bound=rest_bound, candidates=n_kept, tokens=tokens, label=label, notes=notes)
