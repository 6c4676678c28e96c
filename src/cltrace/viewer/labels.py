"""Feature labels and dashboards for the viewer, from the feature database when there is one.

The server answers requests from a thread pool, and a sqlite3 connection belongs to the thread that opened it
unless told otherwise; so the database is opened once with `check_same_thread=False` and every use goes
through one lock (FeatureDB itself is unchanged: it takes any connection). Without a database, labels come from
the graph's meta (`cltrace trace --features`) and the person's edits are kept in the graph's viewer state.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from cltrace.errors import CltraceError
from cltrace.features.db import FeatureCard, FeatureDB, sqlite_errors


class Labels:
    """Labels and cards of (layer, feature) pairs; `db` may be None."""

    def __init__(self, db_path: str | Path | None):
        self.db: FeatureDB | None = None
        self.lock = threading.Lock()
        self.cache: dict[tuple[int, int], str] = {}
        if db_path is not None:
            path = Path(db_path)
            if not path.is_file():
                raise CltraceError(f"no feature database at {path}: build one with `cltrace features build`")
            with sqlite_errors(path):
                conn = sqlite3.connect(str(path), timeout=5.0, check_same_thread=False)
            try:
                self.db = FeatureDB(conn, path)
            except BaseException:
                conn.close()
                raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def fits(self, layer: int, feature: int) -> bool:
        return self.db is not None and 0 <= layer < self.db.n_layers and 0 <= feature < self.db.n_features

    def labels(self, refs: list[tuple[int, int]], fallback: dict[str, str]) -> list[str]:
        """One label per ref: the database's (a person's, an LLM's, else automatic), else `fallback["L:F"]`."""
        out = []
        with self.lock:
            for layer, f in refs:
                key = f"{layer}:{f}"
                if key in fallback:
                    out.append(fallback[key])
                elif self.fits(layer, f):
                    if (layer, f) not in self.cache:
                        self.cache[(layer, f)] = self.db.label(layer, f)
                    out.append(self.cache[(layer, f)])
                else:
                    out.append("")
        return out

    def card(self, layer: int, feature: int) -> FeatureCard | None:
        if not self.fits(layer, feature):
            return None
        with self.lock:
            return self.db.feature(layer, feature)

    def set_label(self, layer: int, feature: int, label: str) -> bool:
        """Write a person's label to the database; False when there is no database for this feature."""
        if not self.fits(layer, feature):
            return False
        with self.lock:
            self.db.set_label(layer, feature, label, author="viewer")
            self.cache.pop((layer, feature), None)
        return True


def card_json(card: FeatureCard, activation: float | None) -> dict:
    """The dashboard as the page draws it (rounded; examples as token/activation lists)."""

    def ex(e) -> dict:
        return {"value": round(e.value, 4), "tokens": e.tokens, "acts": [round(a, 3) for a in e.acts],
                "center": e.center}

    def tv(items) -> list:
        return [{"token": t.token, "value": round(t.value, 4)} for t in items]

    return {
        "layer": card.layer, "feature": card.feature, "label": card.label, "label_source": card.label_source,
        "auto_label": card.auto_label, "frequency": card.frequency, "count": card.count,
        "max_act": card.max_act, "mean_act": card.mean_act, "histogram": card.histogram,
        "bin_edges": [round(b, 5) for b in card.bin_edges], "activation": activation,
        "top": [ex(e) for e in card.top],
        "quantiles": [{"lo": round(q.lo, 4), "hi": round(q.hi, 4), "examples": [ex(e) for e in q.examples]}
                      for q in card.quantiles if q.examples],
        "output_top": tv(card.output_top), "output_bottom": tv(card.output_bottom), "input_top": tv(card.input_top),
        "tokens_seen": card.tokens_seen,
    }
