"""The ranks of a distributed extraction: torchrun's environment, the process group, and the collectives the
runner uses (identities without distribution); ``--shard i/n`` for independent processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from featstore.errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call initialised the process group (and destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_env() -> DistEnv:
    """Rank and world size from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
    return DistEnv(rank, world, local)


def init_dist(env: DistEnv, device: torch.device) -> None:
    import torch.distributed as dist
    if not env.active or dist.is_initialized():
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE is {env.world} but {var} is not set; start the ranks with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import atexit
    import datetime as _dt
    dist.init_process_group(backend, rank=env.rank, world_size=env.world, timeout=_dt.timedelta(hours=2))
    env.owns_group = True
    # kept for later calls in this process (a domain's train and test splits), destroyed at exit
    atexit.register(destroy_group)


def destroy_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(env: DistEnv, obj):
    """rank 0's ``obj`` on every rank (identity without distribution)."""
    if not env.active:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(env: DistEnv, obj) -> list:
    if not env.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist
        dist.barrier()


def parse_shard(shard) -> tuple[int, int] | None:
    """``None`` | ``(i, n)`` | ``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return None
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        try:
            parsed = (int(a), int(b)) if sep else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise UserError(f"--shard {shard!r}: expected INDEX/COUNT, e.g. 0/2")
        shard = parsed
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {i}/{n}: need 0 <= INDEX < COUNT")
    return (i, n) if n > 1 else None
