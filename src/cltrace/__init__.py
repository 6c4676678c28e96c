"""cltrace: circuit tracing for language models (Ameisen et al. 2025).

The whole loop from one import; the pipeline's packages mirror it (models -> data -> transcoders -> training
-> replacement -> attribution -> interventions):

    import cltrace
    model = cltrace.load_model("gemma-3-270m")                              # a ModelAdapter
    tc = cltrace.train(cltrace.TrainConfig(kind="clt", features_per_layer=2048, tokens=2_000_000,
                                           out="runs/clt"), model=model)    # or cltrace.load_transcoder(DIR)
    print(cltrace.evaluate(model, tc))                                      # NMSE, L0, dead, CE increase, ...
    graph = cltrace.attribute(model, tc, "Fact: Michael Jordan plays the sport of")
    pruned = cltrace.prune(graph, node_threshold=0.8, edge_threshold=0.98)
    replacement, completeness = cltrace.scores(graph, pruned)
    graph.save("graph.safetensors")                                         # cltrace.Graph.load(path)
    result = cltrace.intervene(model, tc, graph.prompt, [cltrace.Intervention(layer=3, pos=8, feature=12, value=0)])
    print(result.to_json())

Features are indexed (layer, pos, feature) everywhere: graph.features rows, Intervention / FeatureRef fields,
node lookups and JSON; the command line writes the same feature as LAYER:FEATURE@POS.
Importing cltrace changes no process-wide state (environment, malloc, warning filters).
"""

from cltrace.attribution import Graph, PruneResult, attribute, head_loadings, prune, qk_attribution, scores
from cltrace.errors import CltraceError, SettingError
from cltrace.features import FeatureDB, build_features, global_weights
from cltrace.interventions import (
    FeatureRef,
    GenerationResult,
    Intervention,
    InterventionResult,
    intervene,
    intervene_generate,
)
from cltrace.models import DEFAULT_MODEL, ModelAdapter, list_models, load_model
from cltrace.replacement import LocalReplacement, build_replacement
from cltrace.training import TrainConfig, evaluate, train
from cltrace.transcoders import Transcoder, TranscoderConfig, load_transcoder, save_transcoder
from cltrace.validation import validate

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "CltraceError", "FeatureDB", "FeatureRef", "GenerationResult", "Graph", "Intervention",
    "InterventionResult", "LocalReplacement", "ModelAdapter", "PruneResult", "SettingError", "TrainConfig",
    "Transcoder", "TranscoderConfig", "attribute", "build_features", "build_replacement", "evaluate", "global_weights",
    "head_loadings", "intervene", "intervene_generate", "list_models", "load_model", "load_transcoder", "prune",
    "qk_attribution", "save_transcoder", "scores", "train", "validate",
]
