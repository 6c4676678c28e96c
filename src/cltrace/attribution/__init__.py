"""Attribution graphs: which features, errors and tokens drive which features and logits."""

from cltrace.attribution.engine import attribute
from cltrace.attribution.graph import Graph

trace = attribute  # `cltrace.attribution.trace(model, transcoders, prompt, ...) -> Graph`

__all__ = ["Graph", "attribute", "trace"]
