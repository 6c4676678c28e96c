"""Device and dtype choices shared by the API and the CLI."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from cltrace.errors import CltraceError, SettingError

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
        raise SettingError(f"device {name!r} asked for, but this machine has no CUDA GPU: use cpu", ("device",))
    return dev


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CltraceError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return DTYPES[name]


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run natively on `device`: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16
    or AMX (oneDNN then runs bf16 autocast at 2-4x fp32's speed; without them bf16 is emulated and slower).

    Measured on a 2-core AVX512-BF16 CPU, Gemma-3-270M's forward over 8 x 128 tokens: 922 tok/s in fp32,
    3,070 tok/s under bf16 autocast (docs/training.md)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def native_precision(device: str | torch.device = "cpu") -> str:
    """"bf16" where bf16 matmuls are native on `device` (`fast_bf16`), else "fp32": the precision the recipe and
    `cltrace cache --precision auto` collect activations in."""
    return "bf16" if fast_bf16(device) else "fp32"


def tune_cpu_memory() -> dict[str, bool]:
    """The CPU memory settings that make training steps and long attributions fast, for this process.

    Called by the entry points that allocate large temporaries over and over (the CLI's `main`, the trainer);
    importing cltrace changes nothing. Two settings, each documented where it is set and each off by choice:
    transparent huge pages for PyTorch's large CPU allocations (THP_MEM_ALLOC_ENABLE=0 in the environment
    keeps them off) and `keep_freed_memory` (CLTRACE_KEEP_FREED_MEMORY=0 keeps glibc's default).
    """
    return {"huge_pages": enable_huge_pages(), "keep_freed_memory": keep_freed_memory()}


def enable_huge_pages() -> bool:
    """Back PyTorch's large CPU allocations with transparent huge pages (it reads THP_MEM_ALLOC_ENABLE once, at
    its first CPU allocation, so this must run before the first tensor is made; a later call changes nothing).

    A CLT training step allocates [N, L, F] temporaries of hundreds of MB; faulting them in 4 KB pages took
    ~0.5 s of a 4.8 s step on a 2-core CPU (a fresh 300 MB zeros: 67 ms, with huge pages 16 ms). An explicit
    THP_MEM_ALLOC_ENABLE in the environment (0 to opt out) is left as it is.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


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
