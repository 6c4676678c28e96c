"""Looking at attribution graphs: a static PNG (plot.py) and the interactive local viewer (`cltrace serve`).

The viewer is a small Starlette app (app.py) over the graphs of one folder (store.py), packed for the page
(payload.py), re-pruned on the edge list (reprune.py), with subgraph scores and supernode suggestions
(analysis.py), feature labels and dashboards from the feature database (labels.py), and model runs (new
graphs, steering: modelrun.py) queued one at a time (jobs.py). security.py guards it; static/ is the page.
This package sits above features, interventions and attribution, below the CLI.
"""

from cltrace.viewer.app import make_app, serve
from cltrace.viewer.plot import node_positions, plot_graph

__all__ = ["make_app", "node_positions", "plot_graph", "serve"]
