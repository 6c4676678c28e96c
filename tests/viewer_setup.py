"""What the viewer tests share: a served folder with a tiny model, its transcoders, a feature database and
graphs (one whose prompt and label carry HTML that must never run), and the headless browser.

Built once per test session (~10 s on 2 cores) in a temporary folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EVIL = "<script>pw(1)</script><img src=x onerror=pw(2)>"  # pw() records a call: the page must make none
PROMPT = "Jordan " + EVIL
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Served:
    root: Path  # the served folder
    model: str  # tiny model folder
    transcoders: str
    features: str  # feature database
    graph: str  # name of the main graph (prompt with EVIL)
    small: str  # a synthetic graph, no model


def build(root: Path) -> Served:
    from cltrace.attribution import attribute, prune, scores
    from cltrace.features import build_features
    from cltrace.models.registry import load_model
    from cltrace.models.tiny import save_tiny
    from cltrace.replacement import random_transcoder
    from cltrace.transcoders.io import save_transcoder
    from cltrace.viewer.synthetic import synthetic_graph

    work = root / "work"
    graphs = root / "graphs"
    graphs.mkdir(parents=True)
    folder = str(save_tiny("llama", work / "tiny-llama"))
    model = load_model(folder)
    tc = random_transcoder(model, "clt", n_features=32, active_per_layer=12, seed=0, prompt=PROMPT)
    save_transcoder(tc, work / "tc")
    text = ("Fact: Michael Jordan plays the sport of basketball. The opposite of hot is cold, and the capital of "
            "France is Paris. Numbers: 36+59=95, 12*3=36. def f(x): return x + 1. ")
    docs = [text[i:i + 21] for i in range(0, 160, 21)]
    db = work / "features.db"
    build_features(model, tc, corpus=docs, n_tokens=8 * 24, context_len=24, batch_size=4, top_k=4,
                   window=(4, 2), n_ranges=3, per_range=2, progress=False, out=db, log=lambda m: None)
    graph = attribute(model, tc, PROMPT)
    pr = prune(graph)
    rep, comp = scores(graph)
    graph.meta.update(vocab_size=model.vocab_size, node_threshold=0.8, edge_threshold=0.98,
                      scores={"replacement": rep, "completeness": comp})
    graph.save(graphs / "evil.safetensors")
    assert int(pr.node_mask.sum()) > 10
    synthetic_graph(300, 2000, n_layers=4, n_pos=6, seed=3).save(graphs / "synth.safetensors")
    return Served(graphs, folder, str(work / "tc"), str(db), "evil", "synth")


def launch_browser(playwright):
    """Debian's chromium, headless (never a downloaded browser); a clear failure when it is missing."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make test does it)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--headless", "--no-sandbox", "--disable-gpu"])
