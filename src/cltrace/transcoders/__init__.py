"""Transcoders: the CLT/PLT module (the one encode/decode), its sparse kernels, and every file format."""

from cltrace.transcoders.io import check_fits, load_transcoder, merge_shards, save_transcoder
from cltrace.transcoders.transcoder import TrainForward, Transcoder, TranscoderConfig

__all__ = ["Transcoder", "TranscoderConfig", "TrainForward", "check_fits", "load_transcoder", "merge_shards",
           "save_transcoder"]
