"""Export the feature database as the feature files other viewers read: circuit-tracer's and Neuronpedia's.

circuit-tracer (`export_circuit_tracer(db, out_dir)`), the schema of its `frontend/feature_models.py`:

    out_dir/{index}.json        one feature: index = Cantor(layer, feature) = (l + f)(l + f + 1)/2 + f, the
                                `node.feature` of a graph file with schema_version 1
    out_dir/index.json.gz       gzip JSON list, one entry per layer: {"filename": "layer_{l}.bin", "offsets":
                                [F + 1 byte offsets]}; feature f of layer l is bytes offsets[f]..offsets[f+1]
    out_dir/layer_{l}.bin       per feature: a 4-byte little-endian length, then the zlib-compressed JSON

Its viewer reads the one-file-per-feature form from `{scan}/{index}.json` for a graph whose `scan` starts with
"./" (and Neuronpedia's graph UI from `{feature_json_base_url}/{index}.json`); its local server (`serve(...,
features_dir=out_dir)`) reads the binary form, with HTTP Range requests, for a graph whose `scan` starts with
"/". Both forms hold the same JSON:

    transcoder_id, index                       the transcoder set's name, the Cantor id
    examples_quantiles                         [{quantile_name, examples: [{tokens, tokens_acts_list,
                                               train_token_ind, is_repeated_datapoint}]}]: "Top activations",
                                               then one group per activation range, highest first
    top_logits, bottom_logits                  promoted / suppressed token strings
    act_min, act_max                           0 and the max activation (the colour scale)
    quantile_values                            100 percentiles of the activation where the feature fires
    histogram                                  bar heights over [act_min, act_max] (linear bins)
    activation_frequency                       fraction of tokens where it fires
    extra keys (the viewer ignores them)       layer, feature_index, label, label_source, top_logits_values,
                                               bottom_logits_values

The database keeps a log-spaced histogram (`features.stats`). The linear `histogram` and the
`quantile_values` are read off it, spreading each log bin's count uniformly over the bin, so they are exact
to within one log bin (a factor 1.33 in activation with the defaults); the histogram's bars sum to the count.

Neuronpedia (`export_neuronpedia(db, out_dir)`), the dashboard batches of SAEDashboard's
`neuronpedia_converter.py`:

    out_dir/{layer}-{name}/batch-{n}.json   {model_id, layer, sae_set, features: [...]}, `batch_size` each

per feature: feature_index, pos_str / pos_values, neg_str / neg_values (promoted / suppressed tokens with
their values), frac_nonzero, freq_hist_data_bar_values / _heights (the linear histogram: bar centres and
counts), activations [{tokens, values, bin_min, bin_max, bin_contains}] (top examples with bin_min −1,
bin_max the max and bin_contains −1; then each range's examples with its bounds and the fraction of the
feature's activations inside it), n_prompts_total, n_tokens_in_prompt, dataset. Fields the database does not
measure (logit histograms, neuron alignment, correlated features, decoder weight distribution) are written
as empty lists.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cltrace.attribution.export import cantor
from cltrace.errors import CltraceError
from cltrace.features.db import Example, FeatureCard, FeatureDB

CHUNK = 256  # cards read from the database at a time
_SPEC = re.compile(r"^(\d+):(\d+|\*)$")


# ---------------------------------------------------------------------- which features
def parse_features(spec: str) -> list[tuple[int, int | None]]:
    """"3:12,5:7,6:*" -> [(3, 12), (5, 7), (6, None)] (None: every feature of the layer)."""
    out: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = _SPEC.match(part)
        if not m:
            raise CltraceError(f"cannot read feature {part!r}: write LAYER:FEATURE (or LAYER:* for a whole layer), "
                               "comma-separated, e.g. 3:12,5:7")
        out.append((int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))))
    if not out:
        raise CltraceError(f"no feature in {spec!r}: write LAYER:FEATURE, comma-separated, e.g. 3:12,5:7")
    return out


def resolve_features(db: FeatureDB, features: Iterable | str | None) -> list[tuple[int, int]]:
    """Every feature of the database (None), or the ones named: (layer, feature) pairs, (layer, None) for a
    whole layer, or a "3:12,5:7" string. Sorted by (layer, feature), without repeats; each one checked."""
    if features is None:
        return [(a, f) for a in range(db.n_layers) for f in range(db.n_features)]
    if isinstance(features, str):
        features = parse_features(features)
    refs = set()
    for layer, f in features:
        if f is None:
            db._check_ref(int(layer), 0)
            refs |= {(int(layer), g) for g in range(db.n_features)}
        else:
            db._check_ref(int(layer), int(f))
            refs.add((int(layer), int(f)))
    return sorted(refs)


def _cards(db: FeatureDB, refs: list[tuple[int, int]], progress: bool, desc: str):
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(refs), unit="feat", desc=desc, dynamic_ncols=True)
    try:
        for i in range(0, len(refs), CHUNK):
            cards = db.features(refs[i:i + CHUNK])
            yield from cards
            if bar is not None:
                bar.update(len(cards))
    finally:
        if bar is not None:
            bar.close()


def feature_labels(db: FeatureDB, refs: Iterable[tuple[int, int]]) -> dict[str, dict[str, str]]:
    """{"LAYER:FEATURE": {"label", "source"}} of the features `refs` (e.g. a graph's): the person's label, else
    a language model's, else the automatic one; source "human", "llm" or "auto". What graphs keep in meta."""
    refs = sorted({(int(a), int(f)) for a, f in refs})
    out = {}
    for i in range(0, len(refs), CHUNK):
        for card in db.features(refs[i:i + CHUNK], examples=False):
            out[card.id] = {"label": card.label, "source": card.label_source}
    return out


# ---------------------------------------------------------------------- the log histogram, re-read
def _log_bins(card: FeatureCard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, lo, hi) of the card's log bins, with hi cut at max_act (the overflow bin ends there)."""
    counts = np.asarray(card.histogram, dtype=np.float64)
    e = np.asarray(card.bin_edges, dtype=np.float64)
    lo = np.concatenate([[0.0], e])
    hi = np.concatenate([e, [math.inf]])
    top = float(card.max_act)
    return counts, np.minimum(lo, top), np.minimum(hi, top)


def mass_between(card: FeatureCard, boundaries: np.ndarray) -> np.ndarray:
    """Counts of nonzero activations between consecutive `boundaries` (rising, from 0 to max_act), each log
    bin's count spread uniformly over the bin. The last interval includes max_act."""
    counts, lo, hi = _log_bins(card)
    b = np.asarray(boundaries, dtype=np.float64)
    out = np.zeros(len(b) - 1)
    for c, a, z in zip(counts, lo, hi):
        if c == 0:
            continue
        if z <= a:  # a bin cut to nothing: all of it at max_act, in the last interval
            out[-1] += c
            continue
        overlap = np.clip(np.minimum(z, b[1:]) - np.maximum(a, b[:-1]), 0.0, None)
        out += c * overlap / (z - a)
    return out


def linear_histogram(card: FeatureCard, bins: int = 50) -> tuple[list[float], list[float]]:
    """(bar centres, bar heights) of `bins` equal bins over [0, max_act]; heights sum to the count."""
    if card.max_act <= 0:
        return [0.0] * bins, [0.0] * bins
    b = np.linspace(0.0, card.max_act, bins + 1)
    heights = mass_between(card, b)
    return ((b[:-1] + b[1:]) / 2).tolist(), [round(float(h), 4) for h in heights]


def percentiles(card: FeatureCard, n: int = 100) -> list[float]:
    """The 100/n, 200/n, ..., 100th percentiles of the activation where the feature fires (the last is the
    max), interpolated within the log bins (linearly in the first bin, geometrically in the others)."""
    if card.count <= 0 or card.max_act <= 0:
        return [0.0] * n
    counts, lo, hi = _log_bins(card)
    total = counts.sum()
    cum = np.cumsum(counts)
    out = []
    for q in range(1, n + 1):
        target = total * q / n
        i = min(int(np.searchsorted(cum, target - 1e-9 * total)), len(counts) - 1)
        c = counts[i]
        frac = 1.0 if c == 0 else min(1.0, max(0.0, (target - (cum[i] - c)) / c))
        a, z = lo[i], hi[i]
        if z <= a:
            v = z
        elif i == 0 or a <= 0:
            v = a + frac * (z - a)
        else:
            v = a * (z / a) ** frac
        out.append(float(min(v, card.max_act)))
    out[-1] = float(card.max_act)
    return out


def _finite(xs: list[float]) -> list[float]:
    return [float(x) if math.isfinite(x) else 0.0 for x in xs]


def _ranges(card: FeatureCard):
    """(position from the top, index, range) of the card's quantile ranges with examples, highest first."""
    R = len(card.quantiles)
    return [(k, R - 1 - k, q) for k, q in enumerate(card.quantiles[::-1]) if q.examples]


# ---------------------------------------------------------------------- circuit-tracer
def circuit_tracer_feature(card: FeatureCard, transcoder_id: str = "", *, hist_bins: int = 50) -> dict:
    """One feature as circuit-tracer's feature JSON (see the module docstring)."""
    seen: set = set()

    def example(ex: Example) -> dict:
        key = (tuple(ex.token_ids), ex.center)
        repeated = key in seen
        seen.add(key)
        return {"tokens": ex.tokens, "tokens_acts_list": _finite(ex.acts), "train_token_ind": ex.center,
                "is_repeated_datapoint": repeated}

    groups = [{"quantile_name": "Top activations", "examples": [example(ex) for ex in card.top]}]
    for k, _, q in _ranges(card):
        groups.append({"quantile_name": f"Subsample interval {k} ({q.lo:.3g} to {q.hi:.3g})",
                       "examples": [example(ex) for ex in q.examples]})
    _, heights = linear_histogram(card, hist_bins)
    return {
        "transcoder_id": transcoder_id,
        "index": cantor(card.layer, card.feature),
        "examples_quantiles": groups,
        "top_logits": [t.token for t in card.output_top],
        "bottom_logits": [t.token for t in card.output_bottom],
        "act_min": 0.0,
        "act_max": float(card.max_act),
        "quantile_values": percentiles(card),
        "histogram": heights,
        "activation_frequency": float(card.frequency),
        "layer": card.layer,
        "feature_index": card.feature,
        "label": card.label,
        "label_source": card.label_source,
        "top_logits_values": [t.value for t in card.output_top],
        "bottom_logits_values": [t.value for t in card.output_bottom],
    }


def default_name(db: FeatureDB) -> str:
    """The transcoder set's name in exports: its kind and the start of its sha256, e.g. clt-3f2a9c1e."""
    return f"{db.meta['transcoder']['kind']}-{db.meta['transcoder_sha256'][:8]}"


def export_circuit_tracer(db: FeatureDB | str | os.PathLike, out_dir: str | os.PathLike, features=None, *,
                          transcoder_id: str | None = None, binary: bool = True, hist_bins: int = 50,
                          progress: bool = False) -> Path:
    """Write circuit-tracer's feature files for `features` (None: all; see `resolve_features`) into
    `out_dir`: one {index}.json per feature and, with `binary`, index.json.gz + layer_{l}.bin (see the module
    docstring). The binary files hold the features of this export only; the JSON files add to a folder."""
    db, close = _open(db)
    try:
        refs = resolve_features(db, features)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tid = transcoder_id or default_name(db)
        F = db.n_features
        starts: dict[int, np.ndarray] = {}  # layer -> [F + 1] start of each feature's record, -1 if none
        files: dict[int, object] = {}
        try:
            for card in _cards(db, refs, progress, "export"):
                data = circuit_tracer_feature(card, tid, hist_bins=hist_bins)
                text = json.dumps(data, ensure_ascii=False)
                (out / f"{data['index']}.json").write_text(text, encoding="utf-8")
                if not binary:
                    continue
                if card.layer not in files:
                    files[card.layer] = open(out / f"layer_{card.layer}.bin.tmp", "wb")  # closed below
                    starts[card.layer] = np.full(F + 1, -1, dtype=np.int64)
                f = files[card.layer]
                starts[card.layer][card.feature] = f.tell()
                record = zlib.compress(text.encode("utf-8"))
                f.write(struct.pack("<I", len(record)) + record)
        except BaseException:
            for layer, f in files.items():
                f.close()
                (out / f"layer_{layer}.bin.tmp").unlink(missing_ok=True)
            raise
        for layer, f in files.items():
            starts[layer][F] = f.tell()
            f.close()
        if binary:
            index = []
            for layer in range(db.n_layers):
                if layer not in starts:
                    index.append({"filename": "", "offsets": [0] * (F + 1)})
                    continue
                off = starts[layer]
                for g in range(F - 1, -1, -1):  # records are contiguous: a feature not exported is empty
                    if off[g] < 0:
                        off[g] = off[g + 1]
                os.replace(out / f"layer_{layer}.bin.tmp", out / f"layer_{layer}.bin")
                index.append({"filename": f"layer_{layer}.bin", "offsets": off.tolist()})
            names = {e["filename"] for e in index}
            for old in out.glob("layer_*.bin"):  # a previous export's layers that this one does not have
                if old.name not in names:
                    old.unlink()
            with gzip.open(out / "index.json.gz", "wt", encoding="utf-8") as f:
                json.dump(index, f)
        return out
    finally:
        if close:
            db.close()


def read_binary_feature(out_dir: str | os.PathLike, layer: int, feature: int) -> dict | None:
    """Read one feature back from the binary form as circuit-tracer's viewer does (None: not exported)."""
    out = Path(out_dir)
    with gzip.open(out / "index.json.gz", "rt", encoding="utf-8") as f:
        entry = json.load(f)[layer]
    a, b = entry["offsets"][feature], entry["offsets"][feature + 1]
    if not entry["filename"] or b <= a:
        return None
    with open(out / entry["filename"], "rb") as f:
        f.seek(a)
        data = f.read(b - a + 1)  # the viewer's Range header is inclusive: one byte more
    (n,) = struct.unpack("<I", data[:4])
    return json.loads(zlib.decompress(data[4:4 + n]).decode("utf-8"))


# ---------------------------------------------------------------------- Neuronpedia
def neuronpedia_feature(card: FeatureCard, db_meta: dict, *, hist_bins: int = 50) -> dict:
    """One feature as a Neuronpedia dashboard feature (see the module docstring)."""
    centres, heights = linear_histogram(card, hist_bins)
    acts = [{"tokens": ex.tokens, "values": _finite(ex.acts), "bin_min": -1, "bin_max": float(card.max_act),
             "bin_contains": -1} for ex in card.top]
    R = len(card.quantiles)
    inside = mass_between(card, np.linspace(0.0, card.max_act, R + 1)) if card.max_act > 0 else np.zeros(R)
    for _, r, q in _ranges(card):
        share = float(inside[r] / card.count) if card.count else 0.0
        acts += [{"tokens": ex.tokens, "values": _finite(ex.acts), "bin_min": float(q.lo), "bin_max": float(q.hi),
                  "bin_contains": share} for ex in q.examples]
    return {
        "feature_index": card.feature,
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [t.token for t in card.output_bottom], "neg_values": [t.value for t in card.output_bottom],
        "pos_str": [t.token for t in card.output_top], "pos_values": [t.value for t in card.output_top],
        "frac_nonzero": float(card.frequency),
        "freq_hist_data_bar_values": centres, "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": int(db_meta.get("n_contexts", 0)),
        "n_tokens_in_prompt": int(db_meta.get("context_len", 0)),
        "dataset": str(db_meta.get("corpus", "")),
        "decoder_weights_dist": [],
        "activations": acts,
        "label": card.label, "label_source": card.label_source,  # extra: Neuronpedia's explanations are separate
    }


def export_neuronpedia(db: FeatureDB | str | os.PathLike, out_path: str | os.PathLike, features=None, *,
                       model_id: str | None = None, sae_set: str | None = None, batch_size: int = 128,
                       hist_bins: int = 50, progress: bool = False) -> Path:
    """Write Neuronpedia dashboard batches for `features` (None: all) under `out_path`:
    {layer}-{sae_set}/batch-{n}.json with `batch_size` features each (see the module docstring)."""
    if batch_size < 1:
        raise CltraceError("batch_size must be at least 1")
    db, close = _open(db)
    try:
        refs = resolve_features(db, features)
        out = Path(out_path)
        out.mkdir(parents=True, exist_ok=True)
        sae_set = sae_set or default_name(db)
        model_id = model_id or str(db.meta.get("model", ""))
        batch: list[dict] = []
        counters: dict[int, int] = {}
        layer_of_batch = None

        def flush() -> None:
            if not batch:
                return
            folder = out / f"{layer_of_batch}-{sae_set}"
            folder.mkdir(exist_ok=True)
            n = counters.get(layer_of_batch, 0)
            counters[layer_of_batch] = n + 1
            data = {"model_id": model_id, "layer": layer_of_batch, "sae_set": sae_set, "features": batch}
            (folder / f"batch-{n}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
            batch.clear()

        for card in _cards(db, refs, progress, "export"):
            if card.layer != layer_of_batch or len(batch) >= batch_size:
                flush()
                layer_of_batch = card.layer
            batch.append(neuronpedia_feature(card, db.meta, hist_bins=hist_bins))
        flush()
        return out
    finally:
        if close:
            db.close()


def _open(db) -> tuple[FeatureDB, bool]:
    if isinstance(db, FeatureDB):
        return db, False
    return FeatureDB.open(db), True
