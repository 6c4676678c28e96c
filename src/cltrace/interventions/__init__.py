"""Interventions: set, scale or zero transcoder features and watch the model's output change.

`intervene` / `intervene_generate` (api.py) are the entry points; engine.py holds the two run modes
(constrained: local replacement model; free: real model), spec.py parsing and checking, generate.py
sampling.
"""

from cltrace.interventions.api import GenerationResult, InterventionResult, intervene, intervene_generate
from cltrace.interventions.engine import Clean, Run, clean_run, first_order, run_constrained, run_free
from cltrace.interventions.spec import FeatureRef, Intervention, parse_intervention

__all__ = [
    "Clean", "FeatureRef", "GenerationResult", "Intervention", "InterventionResult", "Run", "clean_run",
    "first_order", "intervene",
    "intervene_generate", "parse_intervention", "run_constrained", "run_free",
]
