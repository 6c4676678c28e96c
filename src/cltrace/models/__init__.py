"""Models: the one adapter interface over HF weights, the families it supports, built-in offline models."""

from cltrace.models.adapter import ModelAdapter
from cltrace.models.registry import DEFAULT_MODEL, list_models, load_model

__all__ = ["DEFAULT_MODEL", "ModelAdapter", "list_models", "load_model"]
