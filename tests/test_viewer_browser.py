"""The viewer in a real browser (Debian's chromium, headless, driven by Playwright): the whole workflow.

Open a graph, hover and click a node and read its dashboard, pin nodes, make and rename a supernode, edit a
label, re-prune, reload and find it all restored, steer and see new tokens, export SVG, trace a new graph.
Screenshots of each state go to $CLTRACE_SHOTS (default /tmp/cltrace-viewer-shots). The prompt and a label
carry `<script>` and `<img onerror>`: nothing may run. The page's CSP is bypassed here on purpose, so that
only the page's own escaping stands between that text and execution.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from viewer_setup import EVIL, PROMPT, launch_browser

from cltrace.attribution import Graph
from cltrace.viewer import make_app
from cltrace.viewer.background import Background

SHOTS = Path(os.environ.get("CLTRACE_SHOTS", "/tmp/cltrace-viewer-shots"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser_page(viewer_served):
    s = viewer_served
    app = make_app(s.root, features=s.features, model=s.model, transcoders=s.transcoders)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Background(app) as url, sync_playwright() as p:
        browser = launch_browser(p)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True,
                                      accept_downloads=True)
        context.add_init_script("window.__pwned = []; window.pw = n => window.__pwned.push(n);")
        outside = []

        def offline(route):
            if not route.request.url.startswith(url):
                outside.append(route.request.url)
                return route.abort()
            return route.continue_()

        context.route("**/*", offline)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        yield page, url, errors, outside
        browser.close()


def ready(page) -> None:
    page.wait_for_function("() => window.__cltrace && window.__cltrace.ready")


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def features_shown(page) -> list[str]:
    return page.evaluate("() => __cltrace.nodeIds().filter(id => __cltrace.kindOf(id) === 0)")


def click_node(page, node_id: str, ctrl: bool = False) -> None:
    pos = page.evaluate("id => __cltrace.nodeScreenPos(id)", node_id)
    if ctrl:
        page.keyboard.down("Control")
    page.mouse.click(pos["x"], pos["y"])
    if ctrl:
        page.keyboard.up("Control")


def test_the_whole_workflow(browser_page, viewer_served):
    page, url, errors, outside = browser_page
    page.goto(url)
    ready(page)
    assert page.get_by_test_id("graph-table").is_visible()
    assert PROMPT in page.get_by_test_id("graph-table").inner_text()  # shown as text
    shot(page, "00-graph-list")

    # open a graph
    page.goto(url + "?graph=evil")
    ready(page)
    assert PROMPT in page.get_by_test_id("graph-info").inner_text()
    shot(page, "01-graph")

    # hover: tooltip with the label, the node's edges highlighted
    feats = features_shown(page)
    assert len(feats) >= 4
    target = feats[-1]
    pos = page.evaluate("id => __cltrace.nodeScreenPos(id)", target)
    page.mouse.move(pos["x"], pos["y"])
    tip = page.get_by_test_id("tooltip")
    tip.wait_for(state="visible")
    layer, f, p = target.split("_")
    assert f"L{layer}/{f} @{p}" in tip.inner_text()
    shot(page, "02-hover")

    # click: node pane with edges and the dashboard from the database
    page.mouse.click(pos["x"], pos["y"])
    page.get_by_test_id("top-examples").wait_for()
    assert page.get_by_test_id("edges-in").locator("li").count() > 0
    assert page.get_by_test_id("hist-marker").count() == 1
    assert page.get_by_test_id("promoted").inner_text().startswith("promotes")
    assert page.evaluate("() => __cltrace.state().clicked") == target
    assert f"clicked={target}" in page.url
    shot(page, "03-click-dashboard")

    # edit the label in place (HTML in it must stay text), saved to the database
    page.get_by_test_id("label-input").fill(EVIL)
    page.get_by_test_id("label-save").click()
    page.get_by_test_id("label-status").filter(has_text="database").wait_for()
    from cltrace.features import FeatureDB

    with FeatureDB.open(viewer_served.features) as db:
        assert db.label(int(layer), int(f)) == EVIL
    shot(page, "04-label")

    # pin: the Pin button, then Ctrl-click two more nodes
    page.get_by_test_id("pin-node").click()
    click_node(page, feats[0], ctrl=True)
    click_node(page, feats[1], ctrl=True)
    page.wait_for_function("() => __cltrace.state().pinned.length === 3")
    page.get_by_test_id("sub-scores").filter(has_text="replacement").wait_for()
    assert page.get_by_test_id("sg-node").count() == 3
    shot(page, "05-pinned")

    # group two of them into a supernode and rename it
    page.get_by_test_id("pin-check").nth(0).check()
    page.get_by_test_id("pin-check").nth(1).check()
    page.get_by_test_id("group").click()
    page.get_by_test_id("supernode").wait_for()
    page.get_by_test_id("sn-name").fill("Jordan features")
    page.get_by_test_id("sn-name").press("Tab")
    page.wait_for_function("() => __cltrace.state().supernodes[0]?.name === 'Jordan features'")
    assert page.get_by_test_id("sg-node").count() == 2
    page.get_by_test_id("suggest").click()
    page.get_by_test_id("suggestions").locator("p, .suggestion").first.wait_for()
    shot(page, "06-supernode")

    # drag a subgraph node: its position is kept in the state
    page.get_by_test_id("sg-node").first.scroll_into_view_if_needed()
    box = page.get_by_test_id("sg-node").first.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + 80, box["y"] + 60, steps=5)
    page.mouse.up()
    page.wait_for_function("() => Object.keys(__cltrace.state().layout).length === 1")

    # re-prune at a new node threshold (on the server)
    before = page.get_by_test_id("graph-info").inner_text()
    page.get_by_test_id("node-threshold").fill("0.6")
    page.get_by_test_id("prune").click()
    page.wait_for_function("() => document.querySelector('[data-testid=graph-info]').textContent.includes('0.6/0.98')")
    assert page.get_by_test_id("graph-info").inner_text() != before
    shot(page, "07-repruned")

    # logit difference: a virtual node on top, selected, with its input edges listed
    page.get_by_test_id("diff-a").select_option("0")
    page.get_by_test_id("diff-b").select_option("1")
    page.wait_for_function("() => __cltrace.state().clicked === 'diff_0_1'")
    assert page.get_by_test_id("edges-in").locator("li").count() > 0
    assert "diff=0%2C1" in page.url or "diff=0,1" in page.url
    shot(page, "07b-logit-diff")
    page.get_by_test_id("diff-a").select_option("")
    page.keyboard.press("Escape")

    # search by label
    page.get_by_test_id("search").fill("script")
    page.get_by_test_id("search-hit").first.wait_for()

    # reload: everything restored from the server
    page.wait_for_function("() => __cltrace.saved")  # the state is saved 250 ms after the last change
    page.reload()
    ready(page)
    st = page.evaluate("() => __cltrace.state()")
    assert len(st["pinned"]) == 3 and st["node_threshold"] == 0.6
    assert [s["name"] for s in st["supernodes"]] == ["Jordan features"]
    assert page.get_by_test_id("sn-name").input_value() == "Jordan features"
    assert page.get_by_test_id("node-threshold").input_value() == "0.6"
    assert page.get_by_test_id("sg-node").count() == 2
    shot(page, "08-reloaded")
    # a link with the clicked node reopens it (its label read back from the database)
    page.goto(f"{url}?graph=evil&node=0.8&edge=0.98&clicked={target}")
    ready(page)
    page.get_by_test_id("dash-label").wait_for()
    assert page.get_by_test_id("dash-label").inner_text() == EVIL
    assert page.evaluate("() => __cltrace.state().node_threshold") == 0.8
    shot(page, "08b-link")

    # steer: ablate the pinned features (multiplier 0), 4 tokens, constrained
    page.get_by_test_id("steer-n").fill("4")
    assert page.get_by_test_id("steer-row").count() >= 1
    page.get_by_test_id("steer-run").click()
    page.get_by_test_id("gen-after").wait_for(timeout=60_000)
    assert page.get_by_test_id("gen-after").locator(".gt").count() == 4
    assert page.get_by_test_id("steer-pred").locator("tr").count() > 2
    shot(page, "09-steered")

    # export the graph as SVG (every text escaped) and the subgraph's JSON
    with page.expect_download() as dl:
        page.get_by_test_id("export-svg").click()
    svg = Path(dl.value.path()).read_text()
    assert svg.startswith("<svg") and "&lt;script&gt;" in svg and "<script" not in svg and "<img" not in svg
    with page.expect_download() as dl:
        page.get_by_test_id("export-sub-svg").click()
    assert "Jordan features" in Path(dl.value.path()).read_text()
    (SHOTS / "export.svg").write_text(svg)
    with page.expect_download() as dl:
        page.get_by_test_id("export-png").click()
    assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with page.expect_download() as dl:
        page.get_by_test_id("export-sub-png").click()
    png = Path(dl.value.path()).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    (SHOTS / "export-subgraph.png").write_bytes(png)
    with page.expect_download() as dl:
        page.get_by_test_id("export-sub-json").click()
    sub = json.loads(Path(dl.value.path()).read_text())
    assert len(sub["qParams"]["pinnedIds"]) == 3 and sub["qParams"]["supernodes"][0][0] == "Jordan features"

    # trace a new graph from the page, with progress, and open it
    page.get_by_test_id("new-graph").click()
    page.get_by_test_id("ng-prompt").fill("Hello there")
    page.get_by_test_id("ng-name").fill("hello")
    page.get_by_test_id("ng-go").click()
    page.wait_for_function("() => new URLSearchParams(location.search).get('graph') === 'hello'", timeout=60_000)
    ready(page)
    assert "Hello there" in page.get_by_test_id("graph-info").inner_text()
    shot(page, "10-new-graph")
    assert Graph.load(viewer_served.root / "hello.safetensors").prompt == "Hello there"

    assert page.evaluate("() => window.__pwned") == []
    assert outside == [] and errors == []
    for p in viewer_served.root.glob("hello*"):
        p.unlink()
