"""Training and evaluating transcoders.

    train(TrainConfig(...))                 -> Transcoder saved in cfg.out (acts on raw activations)
    evaluate(model, transcoder, ...)        -> dict: NMSE, explained variance, L0, dead fraction, and the
                                               spliced-in replacement model's CE increase, KL, top-1 agreement
"""

from cltrace.training.config import TrainConfig
from cltrace.training.evaluate import evaluate
from cltrace.training.inmemory import InMemoryActivations
from cltrace.training.trainer import Trainer, TrainingDiverged, open_source, train

__all__ = ["InMemoryActivations", "TrainConfig", "Trainer", "TrainingDiverged", "evaluate", "open_source", "train"]
