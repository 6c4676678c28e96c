"""Validation of attribution graphs over many prompts, as Ameisen et al. (2025) measure them.

For each prompt: the graph's replacement and completeness scores (unpruned and pruned), the pruning curve,
the influence-weighted path length, whether the global replacement model predicts the model's next token,
and faithfulness under perturbation: sampled features are inhibited and the graph's predictions (direct edge,
total effect, influence) are compared with the effects measured in (a) the local replacement model with
frozen attention, (b) the replacement with attention recomputed and (c) the real model, plus how the
replacement's perturbation effect drifts from the real one layer by layer.

    validate(model, transcoders, prompts, out=DIR, compare=OTHER)   the whole run (resumable per prompt)
    load_prompts / Settings / measure_prompt / summarize / render    its parts
"""

from cltrace.validation.api import validate
from cltrace.validation.default_prompts import PROMPTS
from cltrace.validation.prompt_run import Settings, measure_prompt
from cltrace.validation.prompts import Prompt, load_prompts
from cltrace.validation.report import render
from cltrace.validation.summary import summarize

__all__ = ["PROMPTS", "Prompt", "Settings", "load_prompts", "measure_prompt", "render", "summarize", "validate"]
