"""Global weights for the viewer's node pane: GET /api/features/{layer}/{feature}/weights?kind=&direction=&top=.

Needs the server's transcoders (`cltrace serve DIR --model M --transcoders T`); they are loaded on the first
request, or shared with the model host once it has loaded them. Labels and co-activation statistics come from
the server's feature database (`--features DB`), checked once against the transcoders. kind "auto" (the default)
is TWERA when the database has co-activation statistics, else virtual weights.
"""

from __future__ import annotations

import math
import threading

from starlette.exceptions import HTTPException

from cltrace.features.weights import DIRECTIONS, KINDS, global_weights
from cltrace.transcoders.io import load_transcoder
from cltrace.viewer.labels import Labels
from cltrace.viewer.modelrun import ModelHost

MAX_TOP = 200


class WeightsView:
    """The route's state: the transcoders (loaded once) and whether the database was checked against them."""

    def __init__(self, host: ModelHost, labels: Labels):
        self.host, self.labels = host, labels
        self.lock = threading.Lock()
        self._tc = None
        self._checked = None  # the transcoder the database was checked against

    def transcoder(self):
        tc = self.host.transcoder_if_loaded()
        if tc is not None:
            return tc
        if not self.host.transcoders:
            raise HTTPException(409, "global weights need the transcoders: start the server with `cltrace serve DIR "
                                     "--model M --transcoders T`")
        with self.lock:
            if self._tc is None:
                self._tc = load_transcoder(self.host.transcoders, device="cpu")
            return self._tc

    def answer(self, layer: int, feature: int, query) -> dict:
        """The JSON of one request; bad parameters are 400s, errors of the data CltraceErrors (400 too)."""
        kind = query.get("kind", "auto")
        direction = query.get("direction", "upstream")
        if kind not in (*KINDS, "auto"):
            raise HTTPException(400, f"kind must be auto, {', '.join(KINDS)}, not {kind!r}")
        if direction not in DIRECTIONS:
            raise HTTPException(400, f"direction must be upstream or downstream, not {direction!r}")
        try:
            top = int(query.get("top", 10))
        except ValueError:
            raise HTTPException(400, "top must be a whole number") from None
        if not 1 <= top <= MAX_TOP:
            raise HTTPException(400, f"top must be between 1 and {MAX_TOP}")
        tc = self.transcoder()
        db = self.labels.db
        with self.labels.lock:  # one sqlite connection shared by the server's threads
            if db is not None and self._checked is not tc:
                db.check_fits(tc)
                self._checked = tc
            coact = db is not None and bool(db.meta.get("coactivation"))
            if kind == "auto":
                kind = "twera" if coact else "virtual"
            gw = global_weights(tc, layer, feature, db, kind=kind, direction=direction, top=top, check=False)
        out = finite(gw.to_dict())
        out["has_coactivation"] = coact
        return out


def finite(x):
    """JSON has no infinity: a bound that does not exist (ERA without thresholds) is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x
