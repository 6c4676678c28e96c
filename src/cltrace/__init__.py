"""cltrace: circuit tracing for language models (Ameisen et al. 2025).

Pipeline: models -> data -> transcoders -> training -> replacement -> attribution -> interventions.
"""

import os

# PyTorch's CPU allocator backs large allocations with transparent huge pages when this is set (it reads it at
# its first allocation). A CLT training step allocates [N, L, F] temporaries of hundreds of MB; faulting them in
# 4 KB pages took ~0.5 s of a 4.8 s step on a 2-core CPU (a fresh 300 MB zeros: 67 ms, with huge pages 16 ms).
# THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
