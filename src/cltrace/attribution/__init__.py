"""Attribution graphs: which features, errors and tokens drive which features and logits."""

from cltrace.attribution.engine import attribute
from cltrace.attribution.graph import Graph
from cltrace.attribution.heads import EdgeLoading, explain_edges, head_loadings
from cltrace.attribution.prune import PruneResult, keep_pruned, prune, scores
from cltrace.attribution.qk import HeadQuery, QKResult, qk_attribution

__all__ = ["EdgeLoading", "Graph", "HeadQuery", "PruneResult", "QKResult", "attribute", "explain_edges",
           "head_loadings", "keep_pruned", "prune", "qk_attribution", "scores"]
