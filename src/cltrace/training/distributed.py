"""Distributed training on PyTorch's own engine: process groups, the collectives training needs, failures.

Two ways to split the work, combinable as a 2-D mesh of W = data × features ranks:

* data parallel (the `data` dimension): each rank trains on its own rows of every global batch and the
  gradients are averaged, so the result equals one process on the whole batch;
* feature sharded (the `features` dimension): each rank owns a slice of every layer's features (see
  `cltrace.training.sharding`); every rank of a feature group sees the same rows, the reconstruction is
  the sum of the ranks' partial reconstructions, and sums over features (sparsity penalty) are summed too.

Ranks are laid out row-major on the mesh [data, features], so a feature group is W_f consecutive ranks:
on GPUs it stays inside one node (NVLink) when W_f divides the GPUs per node; it carries the per-step
activation-sized all-reduce, the data groups carry one gradient all-reduce per step.

`init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) and
returns a single-process `Dist` when it is absent, so the trainer calls the same hooks either way: every
hook is a no-op on one process.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from cltrace.errors import CltraceError, SettingError
from cltrace.runtime import resolve_device
from cltrace.training.checkpoint import checkpoint_root, latest_checkpoint

ERROR_KEY = "cltrace/first_error"  # where the first failing rank leaves its message in the c10d store


class RankFailure(CltraceError):
    """Another rank failed; the message is that rank's."""


# ---------------------------------------------------------------------- the rank / world abstraction
@dataclass
class Dist:
    """Where this process sits in the [data, features] mesh, its groups, and a count of bytes exchanged.

    With the defaults it is the single-process world and every collective below returns its input.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp_rank: int = 0  # index along the data dimension
    dp_size: int = 1
    fp_rank: int = 0  # index along the feature dimension: which feature shard this rank owns
    fp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_group: object = None  # ProcessGroup of the ranks holding the same feature shard
    fp_group: object = None  # ProcessGroup of the ranks seeing the same rows
    mesh: object = None  # the DeviceMesh, when distributed
    comm_bytes: dict = field(default_factory=lambda: defaultdict(int))  # collective kind -> bytes sent in
    guard: FailureGuard | None = None  # set while a FailureGuard is active: checked once per step

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints, writes metrics and plots, and writes files that every rank shares."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes_shard(self) -> bool:
        """The ranks of data index 0 hold one copy of each feature shard: they write checkpoints."""
        return self.dp_rank == 0

    # ------------------------------------------------------------------ data parallel
    def split_batch(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Rows of a global batch [B, ...] for this data rank: contiguous slice dp_rank of dp_size.

        For sources that serve the whole stream (an in-memory source): every rank draws the same global
        batch (same source, same seed) and keeps its own rows, so no two data ranks train on the same tokens
        and the union is exactly the single-process batch. The trainer's own sources are built as shares
        instead (`source_is_share`), so each rank computes only its own rows. B must be a multiple of
        dp_size (equal rows per rank keep the averaged gradient equal to the global mean's).
        """
        if self.dp_size == 1:
            return tensors
        B = tensors[0].shape[0]
        if B % self.dp_size:
            raise CltraceError(f"batch size {B} is not a multiple of the {self.dp_size} data-parallel ranks")
        n = B // self.dp_size
        return tuple(t[self.dp_rank * n:(self.dp_rank + 1) * n] for t in tensors)

    def source_is_share(self, source) -> bool:
        """Whether `source` serves this data rank's own share of the corpus (`rank`/`world` attributes, as
        `StreamingActivations(..., rank=dp_rank, world=dp_size)`): its batches are then this rank's rows
        already, and `split_batch` must not be applied. A whole-stream source (world 1) is split as before."""
        world = int(getattr(source, "world", 1) or 1)
        if world == 1:
            return False
        if (int(getattr(source, "rank", 0)), world) != (self.dp_rank, self.dp_size):
            raise CltraceError(f"the activation source is share {getattr(source, 'rank', 0)} of {world}, but this "
                               f"process is data rank {self.dp_rank} of {self.dp_size}: build it with "
                               f"rank={self.dp_rank}, world={self.dp_size}")
        return True

    def sum_over_data(self, t: Tensor) -> Tensor:
        """In-place sum over the data group (statistics of every rank's share: normalization scalars)."""
        if self.dp_size == 1:
            return t
        if t.device == self.device:
            return self.all_reduce(t, group=self.dp_group, kind="metrics")
        return t.copy_(self.all_reduce(t.to(self.device), group=self.dp_group, kind="metrics"))  # nccl: on the GPU

    def gather_over_data(self, t: Tensor) -> Tensor:
        """Rows [n_r, ...] of every data rank (n_r may differ) -> [Σ n_r, ...], in data-rank order."""
        if self.dp_size == 1:
            return t
        home, t = t.device, t.to(self.device).contiguous()  # nccl gathers GPU tensors
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.dp_size)]
        dist.all_gather(sizes, n, group=self.dp_group)
        sizes = [int(s) for s in sizes]
        pad = t.new_zeros((max(sizes), *t.shape[1:]))
        pad[:t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in sizes]
        self.comm_bytes["metrics"] += pad.numel() * pad.element_size() * self.dp_size
        dist.all_gather(parts, pad, group=self.dp_group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(home)

    def gather_objects_over_data(self, obj) -> list:
        """[obj of data rank 0, 1, ...] on every rank of the data group (each share's source state)."""
        if self.dp_size == 1:
            return [obj]
        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out

    def average_gradients(self, params: Iterable[torch.nn.Parameter], bucket_mb: float = 64.0) -> None:
        """Mean of each gradient over the data group: one all-reduce per bucket of flattened gradients.

        Why not DDP: the trainer calls transcoder methods other than forward (sparse decode, penalties) and
        feature-sharded parameters must be averaged over the data group only. Missing gradients count as
        zeros so that every rank issues the same collectives.
        """
        if self.guard is not None:
            self.guard.check()  # once per step, before this step's collectives: stop if a peer has failed
        if self.dp_size == 1:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[Tensor] = []
        size = 0
        limit = int(bucket_mb * 2**20)
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= limit:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])  # one buffer, one collective
        self.all_reduce(flat, group=self.dp_group, kind="grad")
        flat /= self.dp_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float,
                       shared: Iterable[torch.nn.Parameter] = ()) -> Tensor:
        """Clip by the norm of the *whole* model's gradient; returns that norm (a tensor: no host sync).

        Call after `average_gradients` (data ranks then hold the same gradients). Feature-sharded
        parameters add their squares across the feature group; `shared` ones (b_dec, W_skip: replicated on
        every shard, with equal gradients) are counted once. One scalar all-reduce per step.
        """
        params = [p for p in params if p.grad is not None]
        shared_ids = {id(p) for p in shared}
        own = [p.grad for p in params if id(p) not in shared_ids]
        rep = [p.grad for p in params if id(p) in shared_ids]
        total = _sum_of_squares(own, self.device)
        if self.fp_size > 1:
            self.all_reduce(total, group=self.fp_group, kind="feature_sums")
        norm = (total + _sum_of_squares(rep, self.device)).sqrt()
        if max_norm > 0 and params:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([p.grad for p in params], scale)
        return norm

    # ------------------------------------------------------------------ feature sharded
    def sum_over_features(self, t: Tensor) -> Tensor:
        """Σ over feature shards, differentiable: all-reduce forward, identity backward.

        Identity backward is right because every rank of the feature group then computes the *same* loss
        from the summed tensor: ∂loss/∂partial_r = ∂loss/∂sum on each rank, no reduction needed.
        Used for the partial reconstructions [N, L, D] and for sums over features (sparsity penalty).
        """
        if self.fp_size == 1:
            return t
        return _SumAcrossShards.apply(t, self)

    def reduce_over_features(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum / min / max of a statistic over feature shards (no gradient): L0 per layer, a layer's smallest
        kept activation. A no-op on one shard."""
        if self.fp_size == 1:
            return t
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        return self.all_reduce(t.detach().clone(), group=self.fp_group, op=ops[op], kind="metrics")

    def from_first_shard(self, t: Tensor) -> Tensor:
        """Feature shard 0's value of `t` on every shard (its features 0.. are the unsharded model's first)."""
        if self.fp_size == 1:
            return t
        return self.reduce_over_features(t if self.fp_rank == 0 else torch.zeros_like(t))

    def gather_features(self, t: Tensor) -> Tensor:
        """[..., k] from every feature rank -> [..., fp_size·k] (no gradient): candidates for a global top-k."""
        if self.fp_size == 1:
            return t
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.fp_size)]
        self.comm_bytes["topk_gather"] += t.numel() * t.element_size() * self.fp_size
        dist.all_gather(parts, t, group=self.fp_group)
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------ plain collectives
    def all_reduce(self, t: Tensor, group=None, op=dist.ReduceOp.SUM, kind: str = "other") -> Tensor:
        """In place; counts the bytes (the tensor's size: what each rank contributes)."""
        if not self.distributed:
            return t
        self.comm_bytes[kind] += t.numel() * t.element_size()
        dist.all_reduce(t, op=op, group=group)
        return t

    def mean_over_data(self, t: Tensor) -> Tensor:
        """Mean of a metric over data ranks (for logging: call at log intervals only)."""
        if self.dp_size == 1:
            return t
        t = t.detach().clone()
        self.all_reduce(t, group=self.dp_group, kind="metrics")
        return t / self.dp_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank: decisions that must agree (time to checkpoint)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.all_reduce(t, op=dist.ReduceOp.MAX, kind="metrics").item())

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reset_comm(self) -> None:
        self.comm_bytes.clear()


class _SumAcrossShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, d: Dist) -> Tensor:
        out = t.contiguous().clone()
        d.all_reduce(out, group=d.fp_group, kind="partial_recon" if out.dim() > 1 else "feature_sums")
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


# ---------------------------------------------------------------------- setting up
def env_world() -> tuple[int, int, int]:
    """(rank, world, local_rank) from the torchrun environment; (0, 1, 0) when it is absent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def init_distributed(feature_shards: int = 1, device: str | torch.device = "auto", *,
                     timeout_s: float | None = None) -> Dist:
    """Join the process group torchrun set up, build the [data, features] mesh; single-process without it.

    Backend: nccl when the device is CUDA, gloo otherwise. On CUDA each process takes GPU LOCAL_RANK.
    timeout_s bounds every collective, so a rank whose peer died does not wait forever (default: the
    CLTRACE_DIST_TIMEOUT environment variable, else 1800 s: rank 0 writing a large checkpoint must fit).
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("CLTRACE_DIST_TIMEOUT", 1800))

    rank, world, local_rank = env_world()
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if world == 1:
        if feature_shards != 1:
            raise SettingError(f"feature_shards={feature_shards} needs as many processes: launch with "
                               f"`torchrun --nproc_per_node {feature_shards} ...`", ("feature_shards",))
        return Dist(device=dev)
    if feature_shards < 1 or world % feature_shards:
        raise SettingError(f"feature_shards={feature_shards} must divide the world size {world}", ("feature_shards",))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type == "mps":
        raise CltraceError("distributed training runs on CUDA (nccl) or CPU (gloo), not on mps")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // feature_shards
    mesh = init_device_mesh(dev.type, (dp, feature_shards), mesh_dim_names=("data", "features"))
    coord = mesh.get_coordinate()  # [data index, feature index] of this rank
    return Dist(rank=rank, world=world, local_rank=local_rank, dp_rank=coord[0], dp_size=dp, fp_rank=coord[1],
                fp_size=feature_shards, device=dev, dp_group=mesh.get_group("data"),
                fp_group=mesh.get_group("features"), mesh=mesh)


def shutdown(d: Dist) -> None:
    if d.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- checkpoints
def checkpoint_dir(out, d: Dist):
    """Where this rank's training checkpoints live: `checkpoints/` (one copy, written by rank 0), or
    `checkpoints/shard-J/` per feature shard J (written by the shard's data-rank-0)."""
    root = checkpoint_root(out)
    return root / f"shard-{d.fp_rank}" if d.fp_size > 1 else root


def find_resume_checkpoint(out, d: Dist):
    """This rank's newest checkpoint, checked to be at the same step on every rank (None: start afresh).

    Shards write their checkpoints independently; a crash between two shards' writes leaves them at
    different steps, which must not be mixed.
    """
    from pathlib import Path

    path = latest_checkpoint(checkpoint_dir(out, d)) if Path(out).exists() else None
    if not d.distributed:
        return path
    steps = [None] * d.world
    dist.all_gather_object(steps, path.name if path is not None else None)
    if len(set(steps)) > 1:
        raise CltraceError(f"the ranks' newest checkpoints in {out} differ ({sorted(set(map(str, steps)))}): a "
                           "crash during checkpointing; delete the newer ones so that every shard has the same step")
    return path


# ---------------------------------------------------------------------- failing together
class FailureGuard:
    """Make a failure on any rank stop every rank with the failing rank's message.

        with FailureGuard(d) as guard:
            for step in ...:
                guard.check()   # cheap: no collective; raises RankFailure once a peer has failed
                ...

    A rank that raises inside the block writes "rank r: <error>" to the c10d store (the first one wins)
    before the exception leaves it. The others learn it three ways: `check()` at the next step; a
    collective that errors because the peer is gone (gloo) is re-raised as RankFailure with the peer's
    message; and a watchdog thread that polls the store and, if the main thread stays blocked in a
    collective for `grace_s` (NCCL can wait until its timeout), prints the message and exits the process.
    """

    def __init__(self, d: Dist, *, poll_s: float = 0.2, grace_s: float = 30.0):
        self.d, self.poll_s, self.grace_s = d, poll_s, grace_s
        self.store = _default_store() if d.distributed else None
        self.peer_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FailureGuard:
        self.d.guard = self
        if self.store is not None:
            self._thread = threading.Thread(target=self._watch, name="cltrace-failure-watchdog", daemon=True)
            self._thread.start()
        return self

    def check(self) -> None:
        if self.peer_error is not None:
            raise RankFailure(self.peer_error)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            # Wait for the watchdog to end here. Left running, it could outlive the main thread: its target
            # (this guard -> Dist -> DeviceMesh -> process groups) can be the last reference to the groups,
            # whose C++ destructor it would then run, GIL released, while the interpreter shuts down; taking
            # the GIL back then ends the thread with pthread_exit through a noexcept destructor:
            # std::terminate, "terminate called without an active exception", SIGABRT after a good run.
            self._thread.join(timeout=self.grace_s)
        self.d.guard = None
        if exc is None or self.store is None or isinstance(exc, RankFailure):
            return False
        peer = self._read_error()
        if peer is not None and not peer.startswith(f"rank {self.d.rank}:"):
            raise RankFailure(peer) from exc  # our error is a consequence of the peer's (a broken collective)
        msg = f"rank {self.d.rank}: {type(exc).__name__}: {exc}"
        try:
            # compare_set: only the first failing rank's message is kept
            self.store.compare_set(ERROR_KEY, "", msg)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; the exception still propagates
            pass
        return False

    def _read_error(self) -> str | None:
        try:
            if self.store.check([ERROR_KEY]):
                return self.store.get(ERROR_KEY).decode()
        except Exception:  # noqa: BLE001 - store host (rank 0 / the agent) gone: nothing to read
            return None
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            msg = self._read_error()
            if msg is None or msg.startswith(f"rank {self.d.rank}:"):
                continue
            self.peer_error = msg
            if self._stop.wait(self.grace_s):
                return  # the main thread saw it and left the guard
            print(f"cltrace: error: {msg} (rank {self.d.rank} stopped: still blocked {self.grace_s:.0f} s later)",
                  file=sys.stderr, flush=True)
            os._exit(1)


def _default_store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


# ---------------------------------------------------------------------- feeding the device
def prefetch(batches: Iterator[tuple[Tensor, ...]], device: torch.device | str, depth: int = 2,
             ) -> Iterator[tuple[Tensor, ...]]:
    """Move batches to `device` in a background thread, `depth` ahead of the consumer.

    On CUDA: pinned host memory and non_blocking copies on a side stream, so reading the next batch from
    disk and copying it overlap the current step; the consumer's stream waits on an event per batch (no
    host synchronization). On CPU the thread still overlaps producing batches (disk, decompression) with
    training. An exception in the producer is re-raised in the consumer.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(stream):
                        moved = tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                    q.put((moved, event))
                else:
                    q.put((tuple(t.to(device) for t in batch), None))
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((e, None))

    thread = threading.Thread(target=produce, name="cltrace-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, event = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                for t in item:  # the tensors are used on the consumer's stream from now on
                    t.record_stream(torch.cuda.current_stream(device))
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                time.sleep(0.01)


def _sum_of_squares(grads: list[Tensor], device) -> Tensor:
    """Σ‖g‖² over a list of gradients, as a float32 scalar (one fused norm per tensor, no temporaries)."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
