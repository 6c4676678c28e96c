"""Turning the raw files of the offline sources into clean plain-text documents.

Each source comes in its own shape (tagged Brown words, raw 2002 email, HTML pages, reST); these small
functions turn one file into text, and `split_document` cuts long texts (whole books) into documents of a
few thousand characters so that mixing "by document" mixes sources finely and the held-out split by
document hash takes passages from everywhere.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from collections.abc import Iterator
from html.parser import HTMLParser

_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_BLANKS_RE = re.compile(r"\n{3,}")


def clean(text: str) -> str:
    """Normalize newlines, strip trailing spaces and runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS_RE.sub("\n\n", text).strip()


def decode(data: bytes) -> str:
    """UTF-8, falling back to Latin-1 (two of the Gutenberg books are Latin-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def split_document(text: str, max_chars: int = 8000, min_chars: int = 200) -> list[str]:
    """Cut a text at paragraph boundaries into pieces of at most ~max_chars; drop tiny leftovers.

    A paragraph longer than max_chars is cut at line boundaries, then hard-cut.
    """
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for para in _paragraphs(text, max_chars):
        if size + len(para) > max_chars and current:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if len(p) >= min_chars]


def _paragraphs(text: str, max_chars: int) -> Iterator[str]:
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            yield para
            continue
        lines = para.split("\n")
        chunk: list[str] = []
        n = 0
        for line in lines:
            while len(line) > max_chars:  # one giant line (minified data): hard cut
                yield line[:max_chars]
                line = line[max_chars:]
            if n + len(line) > max_chars and chunk:
                yield "\n".join(chunk)
                chunk, n = [], 0
            chunk.append(line)
            n += len(line) + 1
        if chunk:
            yield "\n".join(chunk)


# ---------------------------------------------------------------------- Brown corpus
_PUNCT_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}]|'s\b|'re\b|'ll\b|'ve\b|'d\b|'m\b|n't\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def brown_detokenize(tagged: str, para_chars: int = 600) -> str:
    """Brown's `The/at jury/nn ,/, ``/`` ...` -> plain text with normal spacing and quotes.

    The files hold one tab-indented sentence per line and no paragraph marks, so sentences are joined
    into paragraphs of about para_chars characters.
    """
    paragraphs, current = [], ""
    for line in tagged.split("\n"):
        words = [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in line.split()]
        if not words:
            continue
        s = " ".join(words).replace("``", '"').replace("''", '"')
        s = re.sub(r'" (.*?) "', r'"\1"', s)  # glue paired quotes to their contents
        s = _PUNCT_NO_SPACE_BEFORE.sub(r"\1", s)
        s = _NO_SPACE_AFTER.sub(r"\1", s)
        s = re.sub(r"\.\.$", ".", s)  # "Jr." ending a sentence is followed by its own "."
        current = f"{current} {s}" if current else s
        if len(current) >= para_chars:
            paragraphs.append(current)
            current = ""
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------------- email (SpamAssassin ham)
def email_body(raw: str) -> str:
    """Raw RFC 822 message -> its subject and plain-text body, with email addresses replaced.

    Headers (routing, addresses) are dropped; HTML-only messages give "". Addresses in the body
    (quoted replies, signatures) become user@example.com: the text is public but the people are not.
    """
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    parts = []
    for part in msg.walk():
        if part.get_content_type() != "text/plain" or part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            parts.append(payload.decode(charset, errors="replace"))
        except LookupError:  # an unknown charset name
            parts.append(payload.decode("latin-1"))
    body = "\n\n".join(parts)
    if not body.strip():
        return ""
    subject = str(msg.get("Subject", "") or "").strip()
    text = (f"Subject: {subject}\n\n" if subject else "") + body
    return _EMAIL_RE.sub("user@example.com", clean(text))


# ---------------------------------------------------------------------- HTML
class _TextExtractor(HTMLParser):
    """Collect visible text; block elements become line breaks; scripts, styles, tables of contents
    and navigation bars (which repeat on every page of a manual) are dropped."""

    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "pre", "br", "section",
             "article", "header", "footer", "dt", "dd", "blockquote", "table", "title"}
    SKIP_TAGS = {"script", "style", "nav", "head"}
    SKIP_CLASSES = {"docnav", "toc", "sphinxsidebar", "related", "footer", "headerlink", "breadcrumbs"}
    VOID = {"br", "img", "meta", "link", "hr", "input", "area", "base", "col", "embed", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped region)
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self.out.append("\n" if tag in ("br", "li", "tr", "dt", "dd") else "\n\n")
        if tag in self.VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES) or dict(attrs).get("id") == "banner"
        self.stack.append((tag, skip))
        self.skip_depth += skip
        self.pre_depth += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.VOID or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:  # pop up to the matching tag (tolerates unclosed <p>, <li>)
            t, skip = self.stack.pop()
            self.skip_depth -= skip
            self.pre_depth -= t == "pre"
            if t == tag:
                break
        if tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if not self.pre_depth:
            data = re.sub(r"\s+", " ", data)
        self.out.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page, paragraphs separated by blank lines."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.out))
    lines = [line.strip() if not line.startswith("    ") else line.rstrip() for line in text.split("\n")]
    return clean("\n".join(lines))
