"""The feature database: what each transcoder feature does, measured once over a corpus and stored in SQLite.

    build_features(model, tc, out=PATH)    one streaming pass -> PATH (SQLite), resumable, labels kept
    FeatureDB.open(PATH)                   .feature(layer, f) -> FeatureCard, .features([...]), .search(text),
                                           .set_label(...), .label(...), .check_fits(tc, model)
    export_circuit_tracer(db, DIR)         circuit-tracer's feature files; export_neuronpedia(db, DIR): dashboards
    explain_features(db, url=, model=)     labels by a language model (OpenAI-compatible endpoint), resumable
    global_weights(tc, layer, f, db)       a feature's strongest global connections: virtual weights, ERA, TWERA

Modules, one job each: stats (the pass: frequencies, histograms, top-k and quantile examples with windows,
optional co-activation), effects (promoted / suppressed / input tokens from the weights), labels (automatic
labels), db (the SQLite file), build (the pass end to end, checkpoints), show (a card as text or PNG), export
(viewer feature files), explain (labels by a language model), weights (global weights).
This package sits above interventions and below the viewer and the CLI.
"""

from cltrace.features.build import build_features
from cltrace.features.db import Coactivation, Example, FeatureCard, FeatureDB, QuantileRange, SearchHit, TokenValue
from cltrace.features.effects import Effects, input_effects, output_effects
from cltrace.features.explain import ExplainReport, explain_features
from cltrace.features.export import export_circuit_tracer, export_neuronpedia
from cltrace.features.labels import auto_label
from cltrace.features.stats import CoactStats, FeatureStats, Summary
from cltrace.features.weights import GlobalWeights, WeightRow, global_weights

__all__ = [
    "CoactStats", "Coactivation", "Effects", "Example", "ExplainReport", "FeatureCard", "FeatureDB", "FeatureStats",
    "GlobalWeights", "QuantileRange", "SearchHit", "Summary", "TokenValue", "WeightRow", "auto_label",
    "build_features", "explain_features", "export_circuit_tracer", "export_neuronpedia", "global_weights",
    "input_effects", "output_effects",
]
