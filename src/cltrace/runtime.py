"""Device and dtype choices shared by the API and the CLI."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from cltrace.errors import CltraceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else mps where it exists, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CltraceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CltraceError("--device cuda asked for, but this machine has no CUDA GPU: use --device cpu")
    return dev


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CltraceError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return DTYPES[name]


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of returning them to the OS (Linux only).

    PyTorch's CPU allocator is plain malloc/free, and glibc serves blocks above 32 MB with mmap and gives them
    back with munmap on free, so a training step's [N, L, F] temporaries (hundreds of MB) are page-faulted and
    zeroed by the kernel again every step: a 2048-feature CLT step on Gemma-3-270M took 4.0-4.4 s on a
    2-core CPU, 2.7-2.9 s with this (benchmarks/profile_step.py). The cost: the process keeps its peak memory
    until it exits. Called by the trainer and the CLI; CLTRACE_KEEP_FREED_MEMORY=0 turns it off.
    """
    if os.environ.get("CLTRACE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
