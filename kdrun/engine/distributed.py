"""Data-parallel training across processes (`torchrun --nproc_per_node=N -m kdrun ...`).

Every rank builds the same data plan and the same models (same seed). Each global batch of
``trainer.batch_size`` images is split across the ranks, gradients are averaged with one
all-reduce per step (so the optimisation is that of one process with the same batch), BatchNorm
running statistics are averaged at the end of each epoch, and evaluation is sharded and summed.
Only rank 0 writes: the run dir, metrics, checkpoints, the teacher store, the summary. Backend:
NCCL on CUDA (one GPU per rank, ``cuda:<LOCAL_RANK>``), gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def env_world() -> World:
    """The world torchrun describes in the environment (a single process when it describes none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> None:
    if world.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(batch_size: int, world: World) -> slice:
    """This rank's contiguous share of a global batch (shares differ by at most one sample)."""
    return slice(world.rank * batch_size // world.size, (world.rank + 1) * batch_size // world.size)


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def average_gradients(params: list[nn.Parameter], world: World) -> None:
    """Average the gradients of ``params`` over the ranks with one flat all-reduce."""
    if not world.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def average_buffers(module: nn.Module, world: World) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks."""
    if not world.active:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf /= world.size


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    if not world.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
