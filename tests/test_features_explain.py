"""Labels by a language model (`cltrace.features.explain`) against a small OpenAI-like server that the test runs
on 127.0.0.1 (http.server in a thread, port 0). Nothing else is contacted."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
import time

import pytest

from cltrace.cli import main
from cltrace.errors import CltraceError
from cltrace.features import FeatureDB, build_features, explain_features
from cltrace.features.explain import SYSTEM, parse_label, store_label, to_explain
from cltrace.features.show import token_text
from cltrace.models.tiny import tiny_model
from cltrace.replacement.calibrate import random_transcoder

T = 24
TEXT = ("Fact: Michael Jordan plays the sport of basketball. The opposite of hot is cold, and the capital of "
        "France is Paris. Numbers: 36+59=95, 12*3=36.")
DOCS = [TEXT[i:i + T - 3] for i in range(0, 6 * (T - 3), T - 3)]


class Endpoint:
    """An OpenAI-like chat-completions server on 127.0.0.1. `respond(n, body)` -> (status, text) answers the
    n-th request (from 1); by default the label "topic L:F" of the feature named in the prompt."""

    def __init__(self, respond=None):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.respond = respond or (lambda n, body: (200, answer(f"Label: \"topic {feature_of(body)}\".")))
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                           "body": body})
                    n = len(outer.requests)
                status, text = outer.respond(n, body)
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def asked(self) -> list[str]:
        return [feature_of(r["body"]) for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def answer(content: str) -> str:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})


def feature_of(body: dict) -> str:
    return re.match(r"Feature (\d+:\d+) ", body["messages"][1]["content"]).group(1)


@pytest.fixture
def endpoint():
    servers = []

    def start(respond=None) -> Endpoint:
        servers.append(Endpoint(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_model("llama")
    tc = random_transcoder(model, "clt", n_features=8, active_per_layer=20, seed=0)
    path = tmp_path_factory.mktemp("explain") / "f.db"
    build_features(model, tc, out=path, corpus=DOCS, n_tokens=6 * T, context_len=T, batch_size=3, top_k=3,
                   window=(4, 2), n_ranges=2, per_range=2, progress=False, log=lambda msg: None)
    return path


@pytest.fixture
def db_path(built, tmp_path):
    path = tmp_path / "f.db"
    shutil.copy(built, path)
    return path


KW = dict(model="tiny-lm", key_env="CLTRACE_TEST_KEY", retries=0, progress=False, log=lambda msg: None)


def test_explain_stores_labels_asks_once_and_resumes(db_path, endpoint, monkeypatch):
    monkeypatch.setenv("CLTRACE_TEST_KEY", "secret")
    db = FeatureDB.open(db_path)
    fired = [(a, f) for a, f in db.conn.execute("SELECT layer, feature FROM features WHERE count > 0 ORDER BY 1, 2")]
    n_dead = db.n_layers * db.n_features - len(fired)
    human = fired[4]
    db.set_label(*human, "a person's label")
    todo = [ref for ref in fired if ref != human]
    assert len(todo) >= 10

    # 1) --limit 3: the first three features, in order
    ok = endpoint()
    report = explain_features(db, url=ok.url, limit=3, batch_size=2, **KW)
    assert sorted(ok.asked()) == [f"{a}:{f}" for a, f in todo[:3]]
    assert (report.asked, report.written, report.remaining) == (3, 3, len(todo) - 3)
    assert (report.skipped_labelled, report.skipped_dead) == (1, n_dead)
    r = ok.requests[ok.asked().index(f"{todo[0][0]}:{todo[0][1]}")]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer secret"
    assert r["body"]["model"] == "tiny-lm" and r["body"]["messages"][0] == {"role": "system", "content": SYSTEM}
    card = db.feature(*todo[0])
    prompt = r["body"]["messages"][1]["content"]
    for ex in card.top:  # each top context, its token marked
        text = "".join(f"<<{token_text(t)}>>" if i == ex.center else token_text(t) for i, t in enumerate(ex.tokens))
        assert f"({ex.value:.3g}) {text}" in prompt
    assert json.dumps(card.output_top[0].token, ensure_ascii=False) in prompt
    assert (card.label, card.label_source, card.author) == (f"topic {card.id}", "llm", "llm:tiny-lm")

    # 2) the endpoint fails on its 4th request: what was answered is kept, one clear line
    flaky = endpoint(lambda n, body: (500, '{"error": {"message": "overloaded"}}') if n == 4 else
                     (200, answer(f"topic {feature_of(body)}")))
    with pytest.raises(CltraceError) as e:
        explain_features(db, url=flaky.url, batch_size=2, **KW)
    msg = str(e.value)
    assert "HTTP 500" in msg and "overloaded" in msg and "\n" not in msg
    failed = flaky.asked()[3]
    assert sorted(flaky.asked()) == sorted(f"{a}:{f}" for a, f in todo[3:7])  # two batches of two
    written = {card.id for card in db.features(todo) if card.label_source == "llm"}
    assert written == {f"{a}:{f}" for a, f in todo[:7]} - {failed}

    # 3) the rerun asks only the features still without a label, and finishes
    rest = endpoint()
    report = explain_features(db, url=rest.url, batch_size=3, **KW)
    assert sorted(rest.asked()) == sorted({f"{a}:{f}" for a, f in todo} - written)
    assert failed in rest.asked() and report.written == len(rest.asked()) and report.remaining == 0
    asked = ok.asked() + flaky.asked() + rest.asked()
    assert sorted(set(asked)) == sorted(f"{a}:{f}" for a, f in todo) and f"{human[0]}:{human[1]}" not in asked
    assert len(asked) - len(set(asked)) <= 2  # only features of the failed batch are asked again
    assert all(c.label == f"topic {c.id}" and c.label_source == "llm" for c in db.features(todo))
    assert db.label(*human) == "a person's label"
    assert explain_features(db, url=rest.url, **KW).asked == 0  # nothing left

    # 4) a person's label wins over a language model's, even one arriving later; redo never asks about it
    a, f = todo[0]
    db.set_label(a, f, "checked by a person")
    assert not store_label(db, a, f, "late answer", "", "tiny-lm") and db.label(a, f) == "checked by a person"
    again = endpoint(lambda n, body: (200, answer("new topic")))
    report = explain_features(db, url=again.url, features=f"{a}:*", redo=True, **KW)
    llm_in_layer = [ref for ref in todo if ref[0] == a and ref != (a, f)]
    assert sorted(again.asked()) == sorted(f"{x}:{y}" for x, y in llm_in_layer) and report.written == len(llm_in_layer)
    assert db.label(a, f) == "checked by a person" and db.label(*llm_in_layer[0]) == "new topic"
    assert [ref for ref in to_explain(db, redo=True)[0] if ref in (human, (a, f))] == []


def test_errors_are_one_clear_line(db_path, endpoint, monkeypatch):
    monkeypatch.delenv("CLTRACE_TEST_KEY", raising=False)

    def fails(match, **kw):
        with pytest.raises(CltraceError) as e:
            explain_features(db_path, **{**KW, "limit": 1, **kw})
        assert match in str(e.value) and "\n" not in str(e.value), str(e.value)

    ok = endpoint()
    fails("no API key", url=ok.url)
    assert ok.requests == []
    monkeypatch.setenv("CLTRACE_TEST_KEY", "wrong")
    fails("HTTP 401", url=endpoint(lambda n, b: (401, '{"error": {"message": "bad key"}}')).url)
    fails("did not answer like a chat-completions endpoint", url=endpoint(lambda n, b: (200, "<html>hi</html>")).url)
    fails("did not answer like a chat-completions endpoint", url=endpoint(lambda n, b: (200, '{"choices": []}')).url)
    slow = endpoint(lambda n, b: (time.sleep(1.0), (200, answer("late")))[1])
    fails("cannot reach", url=slow.url, timeout=0.2)
    closed = endpoint()
    url = closed.url
    closed.close()
    fails("cannot reach", url=url)
    fails("not an http(s) URL", url="ftp://127.0.0.1/v1")
    # retried: two 503s, then an answer
    flaky = endpoint(lambda n, b: (503, "busy") if n <= 2 else (200, answer("fine")))
    report = explain_features(db_path, url=flaky.url + "/chat/completions", **{**KW, "retries": 2, "limit": 1},
                              backoff=0.01)
    assert report.written == 1 and len(flaky.requests) == 3 and flaky.requests[0]["path"] == "/v1/chat/completions"
    # an empty answer stores nothing
    blank = endpoint(lambda n, b: (200, answer("  \n ")))
    report = explain_features(db_path, url=blank.url, **{**KW, "limit": 2})
    assert (report.asked, report.empty, report.written) == (2, 2, 0)


def test_parse_label():
    assert parse_label('Label: "Michael Jordan".') == "Michael Jordan"
    assert parse_label("\n\n**basketball players**\nbecause ...") == "basketball players"
    assert parse_label("```\nnumbers after '='\n```") == "numbers after '='"
    assert parse_label("x" * 500) == "x" * 120
    assert parse_label("  ") == ""
    assert parse_label("**Label:** `U.S. states`") == "U.S. states"
    assert parse_label("**Label**: *x*") == "x"


def test_cli_explain(db_path, endpoint, capsys):
    ok = endpoint()
    argv = ["features", "explain", "--db", str(db_path), "--url", ok.url, "--model", "m", "--key-env", ""]
    assert main([*argv, "--print-prompt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[system]\n" + SYSTEM) and "Feature 0:" in out and "<<" in out and ok.requests == []
    assert main(["-q", *argv, "--limit", "2", "--retries", "0"]) == 0
    assert len(ok.requests) == 2 and ok.requests[0]["auth"] is None
    with FeatureDB.open(db_path) as db:
        assert [db.label(*map(int, x.split(":"))) for x in ok.asked()] == [f"topic {x}" for x in ok.asked()]
    bad = endpoint(lambda n, b: (404, "no such model"))
    capsys.readouterr()
    assert main([a if a != ok.url else bad.url for a in argv] + ["--retries", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cltrace: error:") and "HTTP 404" in err[-1] and "no such model" in err[-1]
