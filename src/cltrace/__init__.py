"""cltrace: circuit tracing for language models (Ameisen et al. 2025).

Pipeline: models -> data -> transcoders -> training -> replacement -> attribution -> interventions.
"""

__version__ = "0.1.0"
