"""The feature database's pass on many processes (torchrun): shares of the corpus, merged exactly on rank 0.

    batch b of the corpus order (batch_size contexts)  ->  rank b mod W   (every rank reads and tokenizes the
                                                                           whole stream, runs the model on its own)
    each rank: FeatureStats of its share, global context indices  ->  `reduce_stats`: a binary tree of
    point-to-point transfers and `FeatureStats.merge`, so rank 0 ends with exactly the statistics of one pass
    over every batch (see features.stats), holding at most two ranks' statistics at a time.

`current_dist()` is the process group torchrun (or the caller) set up, as training's `Dist` (rank, world,
collectives); one process when there is none. Transfers go through the backend's device: CUDA tensors for
nccl, CPU tensors for gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.features.stats import FeatureStats
from cltrace.training.distributed import Dist, env_world


def current_dist() -> Dist:
    """The initialised default process group as a `Dist` (every rank a data rank); one process without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    return Dist(rank=rank, world=world, local_rank=env_world()[2], dp_rank=rank, dp_size=world, device=device)


def owns(d: Dist, index: int) -> bool:
    """Whether this rank processes item `index` of a sequence split over the ranks (round robin)."""
    return index % d.world == d.rank


def reduce_stats(stats: FeatureStats, d: Dist) -> FeatureStats | None:
    """Merge every rank's statistics into rank 0's (returned there; None elsewhere, whose statistics were sent
    and must be started afresh with `empty_like` before counting more). A binary tree: in round s, rank
    r ≡ 2^s (mod 2^(s+1)) sends to r − 2^s, so log2(W) rounds and two ranks' statistics per process at most."""
    step = 1
    while step < d.world:
        if d.rank % (2 * step) == step:
            send_state(stats.state_dict(), d.rank - step, d)
            return None
        if d.rank % (2 * step) == 0 and d.rank + step < d.world:
            other = stats.empty_like()
            other.load_state_dict(recv_state(d.rank + step, d))
            stats.merge(other)
            del other
        step *= 2
    return stats


def send_state(state: dict[str, Tensor], dst: int, d: Dist) -> None:
    """Send a dict of tensors to rank dst (names, shapes and dtypes first, then each tensor's bytes)."""
    names = sorted(state)
    meta = [(n, tuple(state[n].shape), str(state[n].dtype).removeprefix("torch.")) for n in names]
    dist.send_object_list([meta], dst=dst)
    for n in names:
        raw = _bytes(state[n]).to(d.device)
        if raw.numel():
            d.comm_bytes["feature_stats"] += raw.numel()
            dist.send(raw, dst=dst)


def recv_state(src: int, d: Dist) -> dict[str, Tensor]:
    """The dict of tensors `send_state` sent from rank src, on the CPU."""
    box = [None]
    dist.recv_object_list(box, src=src)
    state = {}
    for name, shape, dtype in box[0]:
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise CltraceError(f"rank {src} sent a tensor of unknown dtype {dtype!r}: run the same cltrace everywhere")
        n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        raw = torch.empty(n, dtype=torch.uint8, device=d.device)
        if n:
            dist.recv(raw, src=src)
        state[name] = raw.cpu().view(dt).reshape(shape)
    return state


def _bytes(t: Tensor) -> Tensor:
    """[n bytes] uint8 view of a tensor (any dtype: gloo and nccl then move plain bytes)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)
