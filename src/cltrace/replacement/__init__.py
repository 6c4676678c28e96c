"""The local replacement model: the model with every MLP swapped for transcoder + error, for one prompt."""

from cltrace.replacement.calibrate import calibrate_thresholds, random_transcoder
from cltrace.replacement.forward import FrozenPass, frozen_forward
from cltrace.replacement.local import ActiveFeatures, LocalReplacement, build_replacement

__all__ = [
    "ActiveFeatures", "FrozenPass", "LocalReplacement", "build_replacement", "calibrate_thresholds",
    "frozen_forward", "random_transcoder",
]
