"""Labels for features written by a language model, through an OpenAI-compatible chat-completions endpoint.

    explain_features(db, url="http://127.0.0.1:8000/v1", model="NAME")     ask, store, resume

Each feature that fired on the corpus and has no label yet gets one request: POST {url}/chat/completions with
{"model", "messages": [system, user], "temperature": 0, "max_tokens": 64} and the key from an environment
variable (`key_env`, default OPENAI_API_KEY) as "Authorization: Bearer KEY" (`key_env=""`: no key, for local
servers). The answer's first line, without quotes or a "Label:" prefix, at most 120 characters, is stored as
the feature's label with author "llm:<model>" (the whole answer goes in the note when it says more).

A person's label always wins: features with a label are skipped, and an answer never replaces a label that is
not a language model's (not even one written while the request was out). Every label is committed when it
arrives, so an interrupted run (Ctrl-C, an HTTP error) keeps what it got, and running the same command again
asks only the features still without a label. `redo=True` asks again for features labelled by a language
model (never a person's).

Requests go out `batch_size` at a time (threads), with a timeout each; HTTP 429 and 5xx answers and network
errors are retried `retries` times with a doubling pause. Other HTTP errors, an answer that is not JSON of the
chat-completions shape, and a missing key stop the run with one CltraceError line. Only the standard library
(urllib.request) speaks HTTP; a loopback URL (127.0.0.1, localhost, ::1) never goes through a proxy.

The prompt. System message (SYSTEM below):

    You label features of a sparse transcoder trained on a language model's MLP layers. A feature activates
    on some tokens of a text and, when active, pushes the model's next-token prediction towards some tokens
    and away from others. From where it activates and what it promotes and suppresses, write a short label
    that says what the feature responds to (and what it does, if that is clear). Answer with the label only:
    at most 8 words, no quotes, no explanation.

User message (`feature_prompt`), for feature 12:345 of an 18-layer CLT:

    Feature 12:345 (layer 12 of 18, clt).
    It fires on 0.0213% of tokens; its largest activation is 6.41.

    Top activations: each line is a piece of text, the token where the feature fires is marked <<like
    this>>, its activation first.
    1. (6.41) Fact: Michael<< Jordan>> plays the sport of
    ...                                                 (the top `n_top` examples, default 10)

    Examples from lower activation ranges:
    - (3.2) ... << Jordan>> ...                         (up to `per_range` examples from each activation
    ...                                                  range with examples, highest first; default 2)

    Tokens it promotes: " basketball", " NBA", ...     (the top 10 output effects, JSON-quoted)
    Tokens it suppresses: " football", ...

    Label:

Tokens show newlines and tabs as ⏎ and ⇥ (as `cltrace features show` does); a window is the database's
(16 tokens before, 8 after by default).
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone

from cltrace.errors import CltraceError
from cltrace.features.db import LLM_AUTHOR, Example, FeatureCard, FeatureDB, sqlite_errors
from cltrace.features.export import resolve_features
from cltrace.features.show import token_text

SYSTEM = (
    "You label features of a sparse transcoder trained on a language model's MLP layers. A feature activates on "
    "some tokens of a text and, when active, pushes the model's next-token prediction towards some tokens and away "
    "from others. From where it activates and what it promotes and suppresses, write a short label that says what "
    "the feature responds to (and what it does, if that is clear). Answer with the label only: at most 8 words, no "
    "quotes, no explanation."
)
MAX_LABEL = 120
RETRY_CODES = (429, 500, 502, 503, 504)


@dataclass
class ExplainReport:
    """What a run did."""

    asked: int = 0  # requests answered
    written: int = 0  # labels stored
    kept_human: int = 0  # answers dropped because a person labelled the feature meanwhile
    empty: int = 0  # answers with no label in them
    skipped_labelled: int = 0  # features that already had a label (a person's, or a language model's)
    skipped_dead: int = 0  # features that never fired on the corpus (nothing to show)
    remaining: int = 0  # features left for a later run (--limit)


# ---------------------------------------------------------------------- the prompt
def _context(ex: Example) -> str:
    return "".join(f"<<{token_text(t)}>>" if i == ex.center else token_text(t) for i, t in enumerate(ex.tokens))


def feature_prompt(card: FeatureCard, *, n_layers: int | None = None, kind: str = "", n_top: int = 10,
                   per_range: int = 2) -> str:
    """The user message for one feature (see the module docstring)."""
    where = f"layer {card.layer}" + (f" of {n_layers}" if n_layers else "") + (f", {kind}" if kind else "")
    lines = [f"Feature {card.id} ({where}).",
             f"It fires on {card.frequency:.4%} of tokens; its largest activation is {card.max_act:.3g}.", "",
             "Top activations: each line is a piece of text, the token where the feature fires is marked <<like "
             "this>>, its activation first."]
    lines += [f"{i}. ({ex.value:.3g}) {_context(ex)}" for i, ex in enumerate(card.top[:n_top], 1)]
    lower = [ex for q in card.quantiles[::-1] for ex in q.examples[:per_range]]
    if lower and per_range > 0:
        lines += ["", "Examples from lower activation ranges:"]
        lines += [f"- ({ex.value:.3g}) {_context(ex)}" for ex in lower]
    def quote(tvs) -> str:
        return ", ".join(json.dumps(t.token, ensure_ascii=False) for t in tvs) or "(none)"

    lines += ["", f"Tokens it promotes: {quote(card.output_top)}", f"Tokens it suppresses: {quote(card.output_bottom)}",
              "", "Label:"]
    return "\n".join(lines)


def parse_label(text: str) -> str:
    """The label in an answer: its first non-empty line (not a code fence), without markdown emphasis, a
    "Label:" prefix, quotes around it or a final period; at most MAX_LABEL characters."""
    for line in text.splitlines():
        line = line.replace("**", "").replace("__", "").strip().lstrip("#").strip()
        if line.startswith("```"):
            continue
        prev = None
        while line != prev:  # 'Label: "x".' -> x
            prev = line = line.strip()
            if line.lower().startswith("label:"):
                line = line[6:]
            if line.endswith(".") and not line.endswith(".."):
                line = line[:-1]
            if len(line) >= 2 and line[0] in _PAIRS and line[-1] == _PAIRS[line[0]]:
                line = line[1:-1]
        if line:
            return line[:MAX_LABEL]
    return ""


_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "*": "*", "«": "»"}


# ---------------------------------------------------------------------- HTTP
def endpoint_of(url: str) -> str:
    """The chat-completions URL: `url` itself if it ends so, else url + /chat/completions."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CltraceError(f"--url {url!r} is not an http(s) URL: give the endpoint's base, e.g. "
                           "http://127.0.0.1:8000/v1")
    base = url.strip().rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _one_line(text: str, n: int = 200) -> str:
    return " ".join(text.split())[:n]


class ChatClient:
    """POST to an OpenAI-compatible chat-completions endpoint (urllib only), with timeouts and retries."""

    def __init__(self, url: str, model: str, *, key: str | None = None, key_env: str = "", timeout: float = 60.0,
                 retries: int = 2, backoff: float = 1.0, max_tokens: int = 64):
        self.endpoint, self.model, self.key, self.key_env = endpoint_of(url), model, key, key_env
        self.timeout, self.retries, self.backoff, self.max_tokens = timeout, retries, backoff, max_tokens
        host = urllib.parse.urlsplit(self.endpoint).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self.opener = urllib.request.build_opener(*handlers)

    def complete(self, messages: list[dict], what: str = "") -> str:
        """The answer's message content; CltraceError (one line) when there is none."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with self.opener.open(req, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in RETRY_CODES and attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                hint = f"check the key in ${self.key_env}" if e.code in (401, 403) else "check --url and --model"
                raise CltraceError(f"{self.endpoint} answered HTTP {e.code} {_one_line(str(e.reason), 60)}"
                                   f"{f' ({detail})' if detail else ''}{what}: {hint}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise CltraceError(f"cannot reach {self.endpoint} ({_one_line(str(reason), 120)}){what}: check --url "
                                   f"and that the server is running (timeout {self.timeout:g} s)") from e
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            got = _one_line(raw.decode("utf-8", "replace"), 80)
            raise CltraceError(f"{self.endpoint} did not answer like a chat-completions endpoint{what} "
                               f"({type(e).__name__}: {got!r}): check --url") from e
        return content


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:  # the body could not be read: the status says enough
        return ""
    try:
        err = json.loads(raw).get("error", raw)
        raw = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    return _one_line(raw, 160)


def api_key(key_env: str | None) -> str | None:
    """The key from environment variable `key_env`; None when key_env is empty (a server without keys)."""
    if not key_env:
        return None
    key = os.environ.get(key_env, "").strip()
    if not key:
        raise CltraceError(f"no API key: set the environment variable {key_env}, name another with --key-env VAR, "
                           "or pass --key-env '' for a server that needs none")
    return key


# ---------------------------------------------------------------------- the run
def to_explain(db: FeatureDB, features=None, *, redo: bool = False) -> tuple[list[tuple[int, int]], ExplainReport]:
    """The features to ask about, in (layer, feature) order: they fired, and have no label (with `redo`: no
    person's label)."""
    refs = resolve_features(db, features)
    with sqlite_errors(db.path):
        labelled = {(a, f): author for a, f, author in db.conn.execute("SELECT layer, feature, author FROM labels")}
        fired = set(db.conn.execute("SELECT layer, feature FROM features WHERE count > 0").fetchall())
    report = ExplainReport()
    todo = []
    for ref in refs:
        author = labelled.get(ref)
        if author is not None and not (redo and author.startswith(LLM_AUTHOR)):
            report.skipped_labelled += 1
        elif ref not in fired:
            report.skipped_dead += 1
        else:
            todo.append(ref)
    return todo, report


def store_label(db: FeatureDB, layer: int, feature: int, label: str, note: str, model: str) -> bool:
    """Write a language model's label unless the feature has a label that is not a language model's; True if
    written."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with sqlite_errors(db.path), db.conn:
        cur = db.conn.execute(
            "INSERT INTO labels (layer, feature, label, note, author, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (layer, feature) DO UPDATE SET label = excluded.label, note = excluded.note, "
            "author = excluded.author, updated_at = excluded.updated_at WHERE labels.author LIKE ?",
            (layer, feature, label, note, LLM_AUTHOR + model, now, LLM_AUTHOR + "%"))
    return cur.rowcount > 0


def explain_features(
    db: FeatureDB | str | os.PathLike, *, url: str, model: str, features=None, limit: int | None = None,
    key_env: str | None = "OPENAI_API_KEY", batch_size: int = 4, timeout: float = 60.0, retries: int = 2,
    backoff: float = 1.0, redo: bool = False, n_top: int = 10, per_range: int = 2, progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExplainReport:
    """Ask the endpoint for a label of each feature still without one and store it (see the module docstring).

    features: None (all) or which ones (see `features.export.resolve_features`); limit: ask about at most this
    many (the next ones in (layer, feature) order; a later run continues). Returns an ExplainReport.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if batch_size < 1:
        raise CltraceError("batch_size must be at least 1")
    if limit is not None and limit < 0:
        raise CltraceError("limit must be 0 or more")
    key = api_key(key_env)
    client = ChatClient(url, model, key=key, key_env=key_env or "", timeout=timeout, retries=retries,
                        backoff=backoff)
    own = not isinstance(db, FeatureDB)
    db = FeatureDB.open(db) if own else db
    try:
        todo, report = to_explain(db, features, redo=redo)
        if limit is not None:
            report.remaining = max(0, len(todo) - limit)
            todo = todo[:limit]
        n_layers, kind = db.n_layers, db.meta["transcoder"]["kind"]
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="feat", desc="explain", dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=batch_size, thread_name_prefix="explain")
        try:
            for i in range(0, len(todo), batch_size):
                cards = db.features(todo[i:i + batch_size])
                futures = {}
                for card in cards:
                    messages = [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": feature_prompt(card, n_layers=n_layers, kind=kind,
                                                                           n_top=n_top, per_range=per_range)}]
                    futures[pool.submit(client.complete, messages, f" for feature {card.id}")] = card
                error = None
                for fut in as_completed(futures):
                    card = futures[fut]
                    try:
                        answer = fut.result()
                    except CltraceError as e:
                        error = error or e
                        continue
                    report.asked += 1
                    label = parse_label(answer)
                    if not label:
                        report.empty += 1
                    elif store_label(db, card.layer, card.feature, label,
                                     answer.strip() if answer.strip() != label else "", model):
                        report.written += 1
                    else:
                        report.kept_human += 1
                    if bar is not None:
                        bar.update(1)
                if error is not None:
                    raise error
        except (KeyboardInterrupt, CltraceError):
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
            say(f"stopped after {report.written} new labels; run the same command again to continue with the "
                "features still without one")
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
        return report
    finally:
        if own:
            db.close()
