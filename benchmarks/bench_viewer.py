"""The viewer's speed, measured in the browser (headless Debian chromium via Playwright).

On a synthetic graph of 5,000 nodes and 50,000 edges (cltrace.viewer.synthetic), shown whole (thresholds 1/1)
and at the default pruning (0.8/0.98):
  first render   from the view request to the drawn canvas (fetch + decode + layout + draw), page-side clock;
                 and from navigation start to the page's ready flag
  hover          mousemove on a node -> tooltip and edges drawn (event timeStamp to the end of the redraw)
  click          click on a node -> selection, neighbours coloured, node pane filled (its synchronous part)
  re-prune       Prune button -> server re-prunes -> new view drawn (end to end)
  payload        bytes of the view response, gzip as sent and uncompressed
  trace          while the server traces a prompt (a tiny random model made larger so that the trace takes
                 seconds), the longest gap between animation frames and the longest main-thread task

Usage:  .venv/bin/python benchmarks/bench_viewer.py [--nodes 5000] [--edges 50000] [--repeat 30]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--edges", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from playwright.sync_api import sync_playwright
    from viewer_setup import launch_browser

    from cltrace.models.registry import load_model
    from cltrace.models.tiny import save_tiny
    from cltrace.replacement import random_transcoder
    from cltrace.transcoders.io import save_transcoder
    from cltrace.viewer import make_app
    from cltrace.viewer.background import Background
    from cltrace.viewer.synthetic import synthetic_graph

    tmp = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    graphs = tmp / "graphs"
    graphs.mkdir()
    t0 = time.perf_counter()
    g = synthetic_graph(args.nodes, args.edges, seed=0)
    g.save(graphs / "synth.safetensors")
    n_edges = int((g.edges != 0).sum())
    print(f"synthetic graph: {g.n_nodes} nodes, {n_edges} edges ({time.perf_counter() - t0:.1f} s to build)",
          file=sys.stderr)
    folder = save_tiny("llama", tmp / "model", n_layers=8, d_model=512)
    model = load_model(str(folder))
    prompt = "Fact: Michael Jordan plays the sport of basketball, and the capital of France is Paris. " * 3
    tc = random_transcoder(model, "clt", n_features=512, active_per_layer=150, seed=0, prompt=prompt)
    save_transcoder(tc, tmp / "tc")
    app = make_app(graphs, model=str(folder), transcoders=str(tmp / "tc"))
    token = app.app.state.viewer.token
    rows = []
    with Background(app) as url, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
        for node_t, edge_t in [(1.0, 1.0), (0.8, 0.98)]:
            view = f"{url}api/graphs/synth/view?node={node_t}&edge={edge_t}"
            raw = httpx.get(view, headers={"Accept-Encoding": "gzip"})
            sent = len(gzip.compress(raw.content)) if raw.headers.get("content-encoding") != "gzip" else None
            with httpx.stream("GET", view, headers={"Accept-Encoding": "gzip"}) as r:
                wire = sum(len(c) for c in r.iter_raw())
            counts = raw.json()["counts"]
            firsts, readies = [], []
            for _ in range(3):
                page.goto(f"{url}?graph=synth&node={node_t}&edge={edge_t}")
                page.wait_for_function("() => window.__cltrace && window.__cltrace.ready")
                firsts.append(page.evaluate("() => __cltrace.timings.firstRender"))
                readies.append(page.evaluate("() => performance.now()"))
            ids = page.evaluate("() => __cltrace.nodeIds()")
            step = max(1, len(ids) // args.repeat)
            hovers, clicks = [], []
            for nid in ids[::step][: args.repeat]:
                pos = page.evaluate("id => __cltrace.nodeScreenPos(id)", nid)
                page.mouse.move(pos["x"], pos["y"])
                hovers.append(page.evaluate("() => __cltrace.timings.hover"))
                page.mouse.click(pos["x"], pos["y"])
                clicks.append(page.evaluate("() => __cltrace.timings.click"))
                page.keyboard.press("Escape")
            prunes = []
            for k in range(6):
                thr = [0.7, 0.9, 0.95, 0.6, 0.85, 1.0][k] if node_t < 1 else [0.99, 1.0][k % 2]
                page.fill("#node-thr", str(thr))
                before = page.evaluate("() => __cltrace.timings.prune || -1")
                page.click("#prune-btn")
                page.wait_for_function(f"() => (__cltrace.timings.prune || -1) !== {before}")
                prunes.append(page.evaluate("() => __cltrace.timings.prune"))
            rows.append((f"{counts['nodes_shown']} nodes / {counts['edges_shown']} edges shown "
                         f"(thresholds {node_t}/{edge_t})", firsts, readies, hovers, clicks, prunes,
                         len(raw.content) if sent is None else sent, wire, len(raw.content)))

        # responsiveness while the server traces a prompt
        page.goto(f"{url}?graph=synth")
        page.wait_for_function("() => window.__cltrace && window.__cltrace.ready")
        page.evaluate("""() => {
          window.__gaps = []; window.__long = [];
          let last = performance.now();
          const f = t => { window.__gaps.push(t - last); last = t; requestAnimationFrame(f); };
          requestAnimationFrame(f);
          new PerformanceObserver(l => l.getEntries().forEach(e => window.__long.push(e.duration)))
            .observe({entryTypes: ['longtask']});
        }""")
        page.wait_for_timeout(300)
        page.evaluate("() => { window.__gaps = []; window.__long = []; }")
        page.click("[data-testid=new-graph]")
        page.fill("[data-testid=ng-prompt]", prompt)
        page.fill("[data-testid=ng-name]", "traced")
        t0 = time.perf_counter()
        page.click("[data-testid=ng-go]")
        # keep interacting while it runs: hover over nodes of the open graph
        ids = page.evaluate("() => __cltrace.nodeIds()")
        k = 0
        while "graph=traced" not in page.url:
            pos = page.evaluate("id => __cltrace.nodeScreenPos(id)", ids[k % len(ids)])
            if pos:
                page.mouse.move(pos["x"], pos["y"])
            k += 1
            page.wait_for_timeout(50)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("the trace did not finish in 300 s")
        trace_s = time.perf_counter() - t0
        gaps = page.evaluate("() => window.__gaps")
        longs = page.evaluate("() => window.__long")
        browser.close()
    _ = token, os

    def ms(xs) -> str:
        return f"{statistics.median(xs):.1f} / {max(xs):.1f}"

    print(f"\nsynthetic graph: {g.n_nodes} nodes, {n_edges} edges; {os.cpu_count()} CPUs, torch threads 1\n")
    print("| view | first render ms (median / max of 3) | page ready ms | hover ms (median / max) | "
          "click ms (median / max) | re-prune end to end ms (median / max) | payload gzip / raw bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, firsts, readies, hovers, clicks, prunes, _sent, wire, rawb in rows:
        print(f"| {name} | {ms(firsts)} | {statistics.median(readies):.0f} | {ms(hovers)} | {ms(clicks)} | "
              f"{ms(prunes)} | {wire:,} / {rawb:,} |")
    print(f"\nwhile a {trace_s:.1f} s trace ran on the server (hovering every 50 ms): longest gap between "
          f"animation frames {max(gaps):.1f} ms (median {statistics.median(gaps):.1f} ms over {len(gaps)} frames), "
          f"longest main-thread task {max(longs) if longs else 0:.0f} ms ({len(longs)} tasks over 50 ms)")


if __name__ == "__main__":
    main()
