"""The feature database: one SQLite file (WAL mode) that dashboards, the viewer and the CLI read.

Tables (see SCHEMA):

    meta            key -> JSON value: provenance (model, transcoder sha256, corpus, tokens, settings, version)
    features        one row per (layer, feature): frequency, count, max/mean activation, histogram (int64 blob),
                    output_top / output_bottom / input_top ([[token id, value], ...] JSON), auto_label
    examples        top and quantile examples: (layer, feature, kind 'top'|'quantile', range_index, rank) ->
                    value, context_id, pos, window_acts (float16 blob: the feature's activation at pos − before
                    .. pos + after, NaN outside the context)
    contexts        id -> the context's token ids (int32 blob)
    tokens          id -> the token as text (and lower-cased, stripped, for search)
    feature_tokens  (token_id, kind, layer, feature): 'act' a token at a top example, 'out' a top promoted
                    token, 'in' a top input token; the index behind search by token
    labels          (layer, feature) -> label, note, author, updated_at: what people wrote, and explanations by
                    a language model (author "llm:<model>", features.explain), which never replace a person's
    coactivation    (layer, feature, partner_layer, partner_feature) -> mean_prod (E[a_i a_j] over the tokens
                    measured), count: the kept partners of each source (build with coactivation=M; else empty)
    coactivation_sources  (layer, feature) -> total (Σ over all partners of E[a_i a_j]), error (a kept
                    mean_prod is low by at most this; a pair not kept has E[a_i a_j] ≤ error)

A rebuild replaces everything except `labels`: people's labels survive new statistics (`save_database`).
Blobs are little-endian. The primary keys index one feature and many features at once (a graph's).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.features.effects import Effects
from cltrace.features.labels import auto_label
from cltrace.features.stats import Summary

SCHEMA_VERSION = 1
SEARCH_TOKENS = 5  # promoted and input tokens per feature listed in feature_tokens
LLM_AUTHOR = "llm:"  # labels written by a language model (features.explain) have author "llm:<model>"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, frequency REAL NOT NULL, count INTEGER NOT NULL,
    max_act REAL NOT NULL, mean_act REAL NOT NULL, histogram BLOB NOT NULL, output_top TEXT NOT NULL,
    output_bottom TEXT NOT NULL, input_top TEXT NOT NULL, auto_label TEXT NOT NULL,
    PRIMARY KEY (layer, feature)) WITHOUT ROWID;
CREATE TABLE examples (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, kind TEXT NOT NULL, range_index INTEGER NOT NULL,
    rank INTEGER NOT NULL, value REAL NOT NULL, context_id INTEGER NOT NULL, pos INTEGER NOT NULL,
    window_acts BLOB NOT NULL,
    PRIMARY KEY (layer, feature, kind, range_index, rank)) WITHOUT ROWID;
CREATE TABLE contexts (id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT NOT NULL, folded TEXT NOT NULL);
CREATE INDEX tokens_folded ON tokens (folded);
CREATE TABLE feature_tokens (
    token_id INTEGER NOT NULL, kind TEXT NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    PRIMARY KEY (token_id, kind, layer, feature)) WITHOUT ROWID;
CREATE TABLE coactivation (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, partner_layer INTEGER NOT NULL,
    partner_feature INTEGER NOT NULL, mean_prod REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (layer, feature, partner_layer, partner_feature)) WITHOUT ROWID;
CREATE INDEX coactivation_partner ON coactivation (partner_layer, partner_feature);
CREATE TABLE coactivation_sources (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, total REAL NOT NULL, error REAL NOT NULL,
    PRIMARY KEY (layer, feature)) WITHOUT ROWID;
CREATE TABLE labels (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, label TEXT NOT NULL, note TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '', updated_at TEXT NOT NULL,
    PRIMARY KEY (layer, feature)) WITHOUT ROWID;
"""


# ---------------------------------------------------------------------- what a reader gets
@dataclass
class TokenValue:
    token: str
    id: int
    value: float


@dataclass
class Example:
    """One example: the token where the feature had `value`, in a window of its context."""

    value: float
    context_id: int
    pos: int  # the example token's position in its context
    tokens: list[str]  # the window's tokens (cut to the context)
    token_ids: list[int]
    acts: list[float]  # the feature's activation at each of them (0 at special tokens, which are not counted)
    center: int  # index of the example token in tokens / acts


@dataclass
class QuantileRange:
    lo: float  # activations in [lo, hi) (the last range includes hi, the max)
    hi: float
    examples: list[Example]


@dataclass
class FeatureCard:
    """Everything the database knows about one feature."""

    layer: int
    feature: int
    label: str  # the person's label, else the automatic one
    label_source: str  # "human", "llm" (an explanation by a language model, author "llm:<model>") or "auto"
    auto_label: str
    note: str
    author: str
    updated_at: str
    frequency: float  # fraction of the tokens seen where it fires (activation > 0)
    count: int  # tokens where it fires
    max_act: float
    mean_act: float  # mean activation where it fires
    histogram: list[int]  # counts of nonzero activations per bin (see bin_edges)
    bin_edges: list[float]  # bin 0 is (0, e[0]), bin i is [e[i-1], e[i]), the last [e[-1], ∞)
    top: list[Example]
    quantiles: list[QuantileRange]
    output_top: list[TokenValue]  # most promoted tokens
    output_bottom: list[TokenValue]  # most suppressed tokens
    input_top: list[TokenValue]  # tokens whose embeddings drive it most
    tokens_seen: int = 0  # tokens of the corpus the statistics were measured on
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.layer}:{self.feature}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Coactivation:
    """A source feature's kept co-activation partners (same or later layer): E[a_i a_j] over the tokens measured."""

    layer: int
    feature: int
    partners: list[tuple[int, int, float, int]]  # (partner layer, partner feature, E[a_i a_j], count), largest first
    total: float  # Σ over all partners, kept or not, of E[a_i a_j]
    error: float  # each kept E[a_i a_j] is low by at most this; a pair not kept has E[a_i a_j] ≤ error
    tokens: int  # tokens the expectations are over


@dataclass
class SearchHit:
    layer: int
    feature: int
    label: str
    why: str  # "label" (a person's), "auto_label", or "token:<kind>" (act / out / in)


# ---------------------------------------------------------------------- provenance
def transcoder_fingerprint(tc) -> str:
    """sha256 of the transcoder's tensors (names, shapes, values at bfloat16) and its kind.

    Taken at bfloat16 so that the same weights loaded in float32 or bfloat16 give the same fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps([tc.cfg.kind, tc.cfg.activation, tc.cfg.reads, tc.cfg.k]).encode())
    def update(t: Tensor) -> None:
        h.update(t.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())

    for name, p in sorted(tc.named_parameters()):
        h.update(f"{name}{tuple(p.shape)}".encode())
        if not tc.lazy or not name.startswith(("W_enc", "W_dec")):
            update(p)
        elif name == "W_enc":  # on disk: layer by layer, the same bytes as the whole [L, D, F] tensor
            for layer in range(tc.n_layers):
                update(tc.encoder(layer))
        else:  # W_dec.<layer>
            update(tc.decoder(int(name.split(".")[1])))
    return h.hexdigest()


@contextmanager
def sqlite_errors(path) -> Iterator[None]:
    """SQLite's exceptions -> one CltraceError line each (locked, corrupt, another kind of file)."""
    try:
        yield
    except sqlite3.OperationalError as e:
        msg = str(e)
        if "locked" in msg or "busy" in msg:
            raise CltraceError(f"{path} is locked by another process (a build or a viewer writing): try again "
                               "when it is done") from e
        if "no such table" in msg or "no such column" in msg:
            raise CltraceError(f"{path} is not a cltrace feature database of this version ({msg}): rebuild it "
                               "with `cltrace features build`") from e
        raise CltraceError(f"{path}: {msg}") from e
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        raise CltraceError(f"{path} is corrupt or not a feature database ({e}): rebuild it with "
                           "`cltrace features build`") from e


# ---------------------------------------------------------------------- reading
class FeatureDB:
    """A feature database opened for reading and labelling. `FeatureDB.open(path)`."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn, self.path = conn, path
        with sqlite_errors(path):
            self.meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            raise CltraceError(f"{path} has feature-database schema {self.meta.get('schema_version')!r}, this "
                               f"cltrace reads {SCHEMA_VERSION}: rebuild it with `cltrace features build`")
        self._token_text: dict[int, str] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, *, timeout: float = 5.0) -> FeatureDB:
        path = Path(path)
        if not path.is_file():
            raise CltraceError(f"no feature database at {path}: build one with `cltrace features build`")
        with sqlite_errors(path):
            conn = sqlite3.connect(str(path), timeout=timeout)
        try:
            return cls(conn, path)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> FeatureDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ shape
    @property
    def n_layers(self) -> int:
        return int(self.meta["transcoder"]["n_layers"])

    @property
    def n_features(self) -> int:
        return int(self.meta["transcoder"]["n_features"])

    def _check_ref(self, layer: int, feature: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= feature < self.n_features):
            raise CltraceError(f"feature {layer}:{feature} is not in {self.path} (it has {self.n_layers} layers "
                               f"× {self.n_features} features, numbered from 0)")

    # ------------------------------------------------------------------ features
    def feature(self, layer: int, feature: int) -> FeatureCard:
        return self.features([(layer, feature)])[0]

    def features(self, refs: Iterable[tuple[int, int]], *, examples: bool = True) -> list[FeatureCard]:
        """Cards of many features at once (e.g. a graph's), in the order given; examples=False skips them."""
        refs = [(int(layer), int(f)) for layer, f in refs]
        for layer, f in refs:
            self._check_ref(layer, f)
        with sqlite_errors(self.path):
            rows, labels, exs = {}, {}, {}
            for ref in set(refs):
                row = self.conn.execute("SELECT frequency, count, max_act, mean_act, histogram, output_top, "
                                        "output_bottom, input_top, auto_label FROM features WHERE layer = ? AND "
                                        "feature = ?", ref).fetchone()
                if row is None:
                    raise CltraceError(f"feature {ref[0]}:{ref[1]} is missing from {self.path} (an unfinished "
                                       "or damaged database): rebuild it with `cltrace features build`")
                rows[ref] = row
                labels[ref] = self.conn.execute("SELECT label, note, author, updated_at FROM labels WHERE "
                                                "layer = ? AND feature = ?", ref).fetchone()
                exs[ref] = self.conn.execute(
                    "SELECT kind, range_index, rank, value, context_id, pos, window_acts FROM examples WHERE "
                    "layer = ? AND feature = ? ORDER BY kind DESC, range_index, rank", ref).fetchall() \
                    if examples else []
            contexts = self._contexts({e[4] for ex in exs.values() for e in ex})
            ids = {int(t) for c in contexts.values() for t in c}
            for row in rows.values():
                ids |= {int(i) for col in (5, 6, 7) for i, _ in json.loads(row[col])}
            self._load_tokens(ids)
        return [self._card(ref, rows[ref], labels[ref], exs[ref], contexts) for ref in refs]

    def _card(self, ref, row, label, exs, contexts) -> FeatureCard:
        layer, f = ref
        freq, count, max_act, mean_act, hist, out_top, out_bot, in_top, auto = row
        window = self.meta["window"]
        top, quant = [], [[] for _ in range(self.meta["n_ranges"])]
        for kind, r, _rank, value, ctx, pos, blob in exs:
            ex = self._example(value, ctx, pos, blob, contexts[ctx], window)
            (top if kind == "top" else quant[r]).append(ex)
        R = self.meta["n_ranges"]
        ranges = [QuantileRange(max_act * r / R, max_act * (r + 1) / R, quant[r]) for r in range(R)]
        human = label is not None and label[0] != ""
        source = ("llm" if label[2].startswith(LLM_AUTHOR) else "human") if human else "auto"
        return FeatureCard(
            layer=layer, feature=f, label=label[0] if human else auto, label_source=source,
            auto_label=auto, note=label[1] if label else "", author=label[2] if label else "",
            updated_at=label[3] if label else "", frequency=freq, count=count, max_act=max_act, mean_act=mean_act,
            histogram=np.frombuffer(hist, dtype="<i8").tolist(), bin_edges=self.bin_edges(), top=top,
            quantiles=ranges, output_top=self._token_values(out_top), output_bottom=self._token_values(out_bot),
            input_top=self._token_values(in_top), tokens_seen=int(self.meta.get("tokens", 0)),
        )

    def _example(self, value, ctx, pos, blob, ids, window) -> Example:
        before, _ = window
        acts = np.frombuffer(blob, dtype="<f2").astype(np.float64)  # [W]
        T = len(ids)
        lo, hi = max(0, pos - before), min(T, pos - before + len(acts))
        acts = acts[lo - (pos - before): hi - (pos - before)]
        tok = [int(t) for t in ids[lo:hi]]
        return Example(value=value, context_id=ctx, pos=pos, tokens=[self._token_text.get(t, "") for t in tok],
                       token_ids=tok, acts=[float(a) for a in acts], center=pos - lo)

    def _token_values(self, text: str) -> list[TokenValue]:
        return [TokenValue(self._token_text.get(int(i), ""), int(i), float(v)) for i, v in json.loads(text)]

    def _contexts(self, ids: set[int]) -> dict[int, np.ndarray]:
        out = {}
        ids = sorted(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"SELECT id, tokens FROM contexts WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({cid: np.frombuffer(blob, dtype="<i4") for cid, blob in self.conn.execute(q, chunk)})
        missing = set(ids) - set(out)
        if missing:
            raise CltraceError(f"{self.path} lacks context {min(missing)} (a damaged database): rebuild it")
        return out

    def _load_tokens(self, ids: set[int]) -> None:
        ids = sorted(i for i in ids if i not in self._token_text)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"SELECT id, text FROM tokens WHERE id IN ({','.join('?' * len(chunk))})"
            self._token_text.update(dict(self.conn.execute(q, chunk)))

    def bin_edges(self) -> list[float]:
        h = self.meta["histogram"]
        lo, hi, n = math.log10(h["lo"]), math.log10(h["hi"]), h["bins"]
        return [10 ** (lo + (hi - lo) * i / n) for i in range(n + 1)]

    # ------------------------------------------------------------------ labels and search
    def set_label(self, layer: int, feature: int, label: str, note: str = "", author: str | None = None) -> None:
        """Write a person's label (an empty label removes it); it survives rebuilds of the statistics."""
        self._check_ref(layer, feature)
        if author is None:
            try:
                author = getpass.getuser()
            except Exception:  # no user name in this environment
                author = ""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with sqlite_errors(self.path), self.conn:
            if label.strip():
                self.conn.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?)",
                                  (layer, feature, label.strip(), note, author, now))
            else:
                self.conn.execute("DELETE FROM labels WHERE layer = ? AND feature = ?", (layer, feature))

    def label(self, layer: int, feature: int) -> str:
        """The person's label, else a language model's explanation, else the automatic label."""
        self._check_ref(layer, feature)
        with sqlite_errors(self.path):
            row = self.conn.execute("SELECT label FROM labels WHERE layer = ? AND feature = ?",
                                    (layer, feature)).fetchone()
            if row:
                return row[0]
            row = self.conn.execute("SELECT auto_label FROM features WHERE layer = ? AND feature = ?",
                                    (layer, feature)).fetchone()
        if row is None:
            raise CltraceError(f"feature {layer}:{feature} is missing from {self.path}: rebuild it")
        return row[0]

    def human_labels(self) -> list[tuple[int, int, str, str, str, str]]:
        """Every person's label: (layer, feature, label, note, author, updated_at)."""
        with sqlite_errors(self.path):
            return self.conn.execute("SELECT * FROM labels ORDER BY layer, feature").fetchall()

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Features whose label (a person's, then the automatic one) contains `text`, then features with
        `text` as a token (case and surrounding spaces ignored) at a top example, among the promoted tokens
        or among the input tokens."""
        text = text.strip()
        if not text:
            return []
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        hits: dict[tuple[int, int], SearchHit] = {}
        with sqlite_errors(self.path):
            queries = [
                ("label", "SELECT layer, feature, label FROM labels WHERE label LIKE ? ESCAPE '\\' "
                          "ORDER BY layer, feature", (like,)),
                ("auto_label", "SELECT layer, feature, auto_label FROM features WHERE auto_label LIKE ? "
                               "ESCAPE '\\' ORDER BY max_act DESC", (like,)),
                ("token", "SELECT ft.layer, ft.feature, ft.kind FROM tokens t JOIN feature_tokens ft ON "
                          "ft.token_id = t.id JOIN features f ON f.layer = ft.layer AND f.feature = ft.feature "
                          "WHERE t.folded = ? ORDER BY ft.kind, f.max_act DESC", (text.lower(),)),
            ]
            for why, q, args in queries:
                for layer, f, what in self.conn.execute(q + f" LIMIT {int(limit)}", args):
                    if (layer, f) not in hits:
                        label = what if why != "token" else ""
                        hits[(layer, f)] = SearchHit(layer, f, label, why if why != "token" else f"token:{what}")
            for hit in hits.values():
                if not hit.label:
                    hit.label = self.label(hit.layer, hit.feature)
        return list(hits.values())[:limit]

    # ------------------------------------------------------------------ co-activation
    def coactivation(self, layer: int, feature: int) -> Coactivation:
        """The co-activation partners of one feature (a database built with coactivation=M)."""
        self._check_ref(layer, feature)
        info = self.meta.get("coactivation")
        if not info:
            raise CltraceError(f"{self.path} has no co-activation statistics: build it with --coactivation M "
                               "(`cltrace features build`)")
        with sqlite_errors(self.path):
            rows = self.conn.execute("SELECT partner_layer, partner_feature, mean_prod, count FROM coactivation "
                                     "WHERE layer = ? AND feature = ? ORDER BY mean_prod DESC",
                                     (layer, feature)).fetchall()
            src = self.conn.execute("SELECT total, error FROM coactivation_sources WHERE layer = ? AND "
                                    "feature = ?", (layer, feature)).fetchone()
        total, error = src if src else (0.0, 0.0)
        return Coactivation(layer, feature, [tuple(r) for r in rows], total, error, int(info["tokens"]))

    # ------------------------------------------------------------------ provenance
    def check_fits(self, tc, model=None) -> None:
        """Raise one CltraceError line when this database was built for other transcoders (or model)."""
        t = self.meta["transcoder"]
        mine = (tc.cfg.kind, tc.n_layers, tc.n_features)
        theirs = (t["kind"], t["n_layers"], t["n_features"])
        if mine != theirs or transcoder_fingerprint(tc) != self.meta["transcoder_sha256"]:
            raise CltraceError(
                f"{self.path} was built for other transcoders ({theirs[0]} {theirs[1]}×{theirs[2]}, sha256 "
                f"{self.meta['transcoder_sha256'][:12]}; these are {mine[0]} {mine[1]}×{mine[2]}, sha256 "
                f"{transcoder_fingerprint(tc)[:12]}): open the database built for these transcoders, or build "
                "one with `cltrace features build`")
        if model is not None and model.name != self.meta["model"]:
            raise CltraceError(f"{self.path} was built on model {self.meta['model']!r}, not {model.name!r}: load "
                               f"model {self.meta['model']!r}")


def database_contents(path: str | os.PathLike) -> dict[str, list[tuple]]:
    """Every table's rows in a fixed order, less the build time: what two builds of the same features share, so
    that a distributed or a resumed build can be compared with a one-process, uninterrupted one by `==`."""
    with sqlite3.connect(path) as c:
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
    out["meta"] = [row for row in out["meta"] if row[0] != "built_at"]
    return out


# ---------------------------------------------------------------------- writing
def existing_labels(path: str | os.PathLike, fingerprint: str) -> list[tuple]:
    """The person-written labels of the database at `path` (none when there is no file), refusing to carry
    labels over to other transcoders."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        old = FeatureDB.open(path)
    except CltraceError as e:
        raise CltraceError(f"{path} exists but cannot be read as a feature database, so its labels cannot be "
                           f"kept ({e}): move it away or delete it") from e
    with old:
        labels = old.human_labels()
        if labels and old.meta.get("transcoder_sha256") != fingerprint:
            raise CltraceError(f"{path} holds {len(labels)} labels written for other transcoders: write the new "
                               "database elsewhere, or move the old one away")
    return labels


def save_database(path: str | os.PathLike, summary: Summary, effects: Effects, *, meta: dict, vocab: list[str],
                  fingerprint: str) -> Path:
    """Write the database atomically (a temporary file, then os.replace), keeping the labels of the database
    already at `path`. A database open in another process (its -wal file exists) is not replaced."""
    path = Path(path)
    labels = existing_labels(path, fingerprint)
    wal = Path(str(path) + "-wal")
    if wal.exists():  # replacing the file under a live write-ahead log would corrupt the new database
        raise CltraceError(f"{path} is open in another process (a viewer?), or {wal.name} was left behind: close "
                           f"it (or delete {wal.name} if no process uses it) and run again")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(str(tmp))
    try:
        conn.executescript(SCHEMA)
        with conn:
            _write(conn, summary, effects, meta={**meta, "schema_version": SCHEMA_VERSION,
                                                 "transcoder_sha256": fingerprint}, vocab=vocab)
            conn.executemany("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?)", labels)
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: readers and a labelling writer do not block
        conn.close()
        os.replace(tmp, path)
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write(conn: sqlite3.Connection, s: Summary, e: Effects, *, meta: dict, vocab: list[str]) -> None:
    L, F = s.count.shape
    T = s.context_len
    R = s.q_val.shape[2]
    meta = {**meta, "n_ranges": R, "per_range": int(s.q_val.shape[3]), "top_k": int(s.top_val.shape[1]),
            "window": list(s.window), "tokens": s.tokens, "n_contexts": int(s.contexts.shape[0]),
            "context_len": T, "final_scale": s.final_scale}
    if s.coact is not None:
        meta["coactivation"] = {"top_m": int(s.coact["top_m"]), "tokens": int(s.coact["tokens"]),
                                "tokens_per_batch": int(s.coact["tokens_per_batch"])}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in sorted(meta.items())])
    conn.executemany("INSERT INTO tokens VALUES (?, ?, ?)",
                     ((i, t, t.strip().lower()) for i, t in enumerate(vocab)))
    ctx = s.contexts.numpy().astype("<i4")
    conn.executemany("INSERT INTO contexts VALUES (?, ?)", ((i, ctx[i].tobytes()) for i in range(len(ctx))))

    # examples: top (range_index 0), then quantile
    tv, tg, tw = s.top_val.numpy(), s.top_gidx.numpy(), s.top_win.numpy().astype("<f2")  # [L, k, F(, W)]
    layer, rank, feat = np.nonzero(tg >= 0)
    conn.executemany("INSERT INTO examples VALUES (?, ?, 'top', 0, ?, ?, ?, ?, ?)", (
        (int(a), int(f), int(r), float(tv[a, r, f]), int(tg[a, r, f] // T), int(tg[a, r, f] % T),
         tw[a, r, f].tobytes()) for a, r, f in zip(layer, rank, feat)))
    qv, qg, qw = s.q_val.numpy(), s.q_gidx.numpy(), s.q_win.numpy().astype("<f2")  # [L, F, R, p(, W)]
    conn.executemany("INSERT INTO examples VALUES (?, ?, 'quantile', ?, ?, ?, ?, ?, ?)", (
        (int(a), int(f), int(r), int(k), float(qv[a, f, r, k]), int(qg[a, f, r, k] // T), int(qg[a, f, r, k] % T),
         qw[a, f, r, k].tobytes()) for a, f, r, k in zip(*np.nonzero(qg >= 0))))

    # features, with automatic labels from the top examples' tokens and the promoted tokens
    act_tok = np.where(tg >= 0, ctx.reshape(-1)[np.clip(tg, 0, None)], -1)  # [L, k, F] token at each example
    count, amax = s.count.numpy(), s.act_max.numpy()
    mean = (s.act_sum / s.count.clamp_min(1)).numpy()
    freq = count / max(s.tokens, 1)
    hist = s.hist.numpy().astype("<i8")
    ot_i, ot_v, ob_i, ob_v = (t.numpy() for t in (e.out_top_ids, e.out_top_vals, e.out_bottom_ids,
                                                  e.out_bottom_vals))
    in_i, in_v = e.in_top_ids.numpy(), e.in_top_vals.numpy()

    def pairs(i, v) -> str:
        return json.dumps([[int(a), round(float(b), 6)] for a, b in zip(i, v)])

    def rows():
        for a in range(L):
            for f in range(F):
                toks = [vocab[t] if t < len(vocab) else "" for t in act_tok[a, :, f] if t >= 0]
                label = auto_label(toks, [vocab[int(t)] for t in ot_i[a, f, :1]])
                yield (a, f, float(freq[a, f]), int(count[a, f]), float(amax[a, f]), float(mean[a, f]),
                       hist[a, f].tobytes(), pairs(ot_i[a, f], ot_v[a, f]), pairs(ob_i[a, f], ob_v[a, f]),
                       pairs(in_i[a, f], in_v[a, f]), label)

    conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())

    # the search index by token
    def token_rows():
        for a in range(L):
            for f in range(F):
                for t in sorted({int(t) for t in act_tok[a, :, f] if t >= 0}):
                    yield t, "act", a, f
                for t in sorted({int(t) for t in ot_i[a, f, :SEARCH_TOKENS]}):
                    yield t, "out", a, f
                for t in sorted({int(t) for t in in_i[a, f, :SEARCH_TOKENS]}):
                    yield t, "in", a, f

    conn.executemany("INSERT INTO feature_tokens VALUES (?, ?, ?, ?)", token_rows())
    if s.coact is not None:
        _write_coactivation(conn, s.coact, F)


def _write_coactivation(conn: sqlite3.Connection, c: dict, F: int) -> None:
    n = max(int(c["tokens"]), 1)
    partner, mean, count = c["partner"].numpy(), (c["sum"] / n).numpy(), c["count"].numpy()  # [G, M]
    g, j = np.nonzero(partner >= 0)
    conn.executemany("INSERT INTO coactivation VALUES (?, ?, ?, ?, ?, ?)", (
        (int(a // F), int(a % F), int(partner[a, b] // F), int(partner[a, b] % F), float(mean[a, b]),
         int(count[a, b])) for a, b in zip(g, j)))
    total, error = (c["total"] / n).numpy(), (c["error"] / n).numpy()
    conn.executemany("INSERT INTO coactivation_sources VALUES (?, ?, ?, ?)", (
        (int(a // F), int(a % F), float(total[a]), float(error[a])) for a in np.nonzero(total > 0)[0]))
