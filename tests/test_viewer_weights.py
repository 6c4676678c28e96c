"""The viewer's global weights: the API route against the library's `global_weights`, its errors, and (slow) the
node pane's section in a real browser, with a label that carries HTML and must be shown, never run."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient
from viewer_setup import EVIL, launch_browser

from cltrace.features import FeatureDB, build_features, global_weights
from cltrace.models.registry import load_model
from cltrace.transcoders.io import load_transcoder
from cltrace.viewer import make_app
from cltrace.viewer.background import Background

BASE = "http://127.0.0.1:8765"
TEXT = ("Fact: Michael Jordan plays the sport of basketball. The opposite of hot is cold, and the capital of "
        "France is Paris. Numbers: 36+59=95, 12*3=36. def f(x): return x + 1. ")


@pytest.fixture(scope="module")
def served(viewer_served, tmp_path_factory):
    """The shared served folder with a database of its own that has co-activation statistics (M = 4, so that
    some pairs are dropped)."""
    s = viewer_served
    model, tc = load_model(s.model), load_transcoder(s.transcoders)
    db = tmp_path_factory.mktemp("weights") / "coact.db"
    build_features(model, tc, corpus=[TEXT[i:i + 21] for i in range(0, 160, 21)], n_tokens=8 * 24,
                   context_len=24, batch_size=4, top_k=4, window=(4, 2), n_ranges=3, per_range=2, progress=False,
                   out=db, log=lambda m: None, coactivation=4)
    return s, tc, db


def feature_with_sources(tc, db) -> tuple[int, int]:
    """A feature of the last layer with kept co-activation sources."""
    with FeatureDB.open(db) as d:
        for f in range(tc.n_features):
            if d.conn.execute("SELECT COUNT(*) FROM coactivation WHERE partner_layer = ? AND partner_feature = ? "
                              "AND layer < ?", (tc.n_layers - 1, f, tc.n_layers - 1)).fetchone()[0] >= 3:
                return tc.n_layers - 1, f
    raise AssertionError("no feature with co-activation sources")


def test_route_returns_the_library_rows(served):
    s, tc, db = served
    layer, f = feature_with_sources(tc, db)
    app = make_app(s.root, features=str(db), model=s.model, transcoders=s.transcoders, token="t")
    with TestClient(app, base_url=BASE) as c, FeatureDB.open(db) as d:
        for kind, direction in (("twera", "upstream"), ("era", "upstream"), ("virtual", "downstream")):
            q = (layer, f) if direction == "upstream" else (0, 5)
            r = c.get(f"/api/features/{q[0]}/{q[1]}/weights?kind={kind}&direction={direction}&top=7")
            assert r.status_code == 200, r.text
            got = r.json()
            want = global_weights(tc, q[0], q[1], d, kind=kind, direction=direction, top=7)
            assert [(x["id"], x["label"]) for x in got["rows"]] == [(w.id, w.label) for w in want.rows]
            assert [x["value"] for x in got["rows"]] == pytest.approx([w.value for w in want.rows], rel=1e-6)
            assert got["rest_bound"] == pytest.approx(want.rest_bound) and got["has_coactivation"] is True
        auto = c.get(f"/api/features/{layer}/{f}/weights").json()  # auto: TWERA when the database has it
        assert auto["kind"] == "twera" and auto["direction"] == "upstream" and len(auto["rows"]) <= 10
        for query, msg in (("kind=nope", "kind must be"), ("direction=up", "direction must be"),
                           ("top=0", "top must be"), ("top=x", "whole number")):
            r = c.get(f"/api/features/{layer}/{f}/weights?{query}")
            assert r.status_code == 400 and msg in r.json()["error"]
        r = c.get(f"/api/features/{tc.n_layers}/0/weights")
        assert r.status_code == 400 and "not in these transcoders" in r.json()["error"]


def test_route_without_transcoders_or_coactivation(served):
    s, tc, _ = served
    with TestClient(make_app(s.root, features=s.features, token="t"), base_url=BASE) as c:
        r = c.get("/api/features/1/0/weights")
        assert r.status_code == 409 and "--transcoders" in r.json()["error"]
    app = make_app(s.root, features=s.features, model=s.model, transcoders=s.transcoders, token="t")
    with TestClient(app, base_url=BASE) as c:  # the shared database has no co-activation statistics
        assert c.get("/api/features/1/0/weights").json()["kind"] == "virtual"
        r = c.get("/api/features/1/0/weights?kind=twera")
        assert r.status_code == 400 and "--coactivation" in r.json()["error"]


@pytest.mark.slow
def test_node_pane_shows_global_weights(served):
    from playwright.sync_api import sync_playwright

    s, tc, db = served
    app = make_app(s.root, features=str(db), model=s.model, transcoders=s.transcoders)
    with Background(app) as url, sync_playwright() as p:
        browser = launch_browser(p)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)
        context.add_init_script("window.__pwned = []; window.pw = n => window.__pwned.push(n);")
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + f"?graph={s.graph}")
        page.wait_for_function("() => window.__cltrace && window.__cltrace.ready")
        ids = page.evaluate("() => __cltrace.nodeIds().filter(id => __cltrace.kindOf(id) === 0)")
        node = min(ids, key=lambda i: int(i.split("_")[0]))  # the graph's pruned features are all of layer 0
        layer, f = (int(x) for x in node.split("_")[:2])
        with FeatureDB.open(db) as d:
            want = global_weights(tc, layer, f, d, kind="twera", direction="downstream", top=15)
            virtual = global_weights(tc, layer, f, d, kind="virtual", direction="downstream", top=15)
            d.set_label(virtual.rows[0].layer, virtual.rows[0].feature, "label " + EVIL)
        assert want.rows, "the clicked feature has no kept co-activation targets"

        pos = page.evaluate("id => __cltrace.nodeScreenPos(id)", node)
        page.mouse.click(pos["x"], pos["y"])
        body, info = page.get_by_test_id("gw-body"), page.get_by_test_id("gw-info")
        info.wait_for()
        assert info.inner_text().startswith("TWERA")  # auto: the database has co-activation statistics
        if layer == 0:
            assert "layer 0 has no earlier features" in body.inner_text()

        page.get_by_test_id("gw-direction").select_option("downstream")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=gw-row]').length > 0")
        rows = page.get_by_test_id("gw-row")
        assert rows.locator(".ref").all_inner_texts() == [w.id for w in want.rows]

        page.get_by_test_id("gw-kind").select_option("virtual")
        page.wait_for_function("() => document.querySelector('[data-testid=gw-info]')?.textContent"
                               ".startsWith('virtual')")
        assert rows.locator(".ref").all_inner_texts() == [w.id for w in virtual.rows]
        values = [float(x) for x in rows.locator(".w").all_inner_texts()]
        assert values == sorted(values, key=abs, reverse=True)
        assert values == pytest.approx([w.value for w in virtual.rows], rel=2e-3, abs=2e-3)  # shown to 3 decimals
        assert page.get_by_test_id("gw-label").first.inner_text() == "label " + EVIL  # shown as text, not run
        assert "every pair not listed" in body.inner_text()
        page.screenshot(path="/tmp/cltrace-viewer-shots/global-weights.png")
        assert page.evaluate("() => window.__pwned") == [] and not errors, errors
        browser.close()
