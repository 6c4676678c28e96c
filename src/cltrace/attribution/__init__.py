"""Attribution graphs: which features, errors and tokens drive which features and logits."""

from cltrace.attribution.engine import attribute
from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import PruneResult, keep_pruned, prune, scores

__all__ = ["Graph", "PruneResult", "attribute", "keep_pruned", "prune", "scores"]
