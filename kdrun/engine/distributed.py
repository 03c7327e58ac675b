"""Data-parallel training across processes (`torchrun --nproc_per_node=N -m kdrun ...`).

Every rank builds the same data plan and the same models (same seed). Each global batch of
``trainer.batch_size`` images is split into contiguous shares, one per rank, and each rank augments
only its own share (kdrun.data.augment.shard_plan): the union of the shares is the batch one process
would train on. What a stage trains (its model, :meth:`extra_modules` such as adapters, exits and
peer edges, and any other parameter it optimises) is wrapped as one module in torch's
:class:`~torch.nn.parallel.DistributedDataParallel`, whose forward is the stage's training step:
DDP all-reduces the gradients in buckets while the backward pass runs, so the optimisation is that
of one process with the whole batch. BatchNorm running statistics are averaged over the ranks at
the end of each epoch (with equal shares the averaged running mean is the one process's), or kept
equal all along by SyncBatchNorm (``trainer.sync_bn=true``, CUDA). Evaluation is sharded and summed.
Only rank 0 writes: the run dir, metrics, checkpoints, the teacher store, the summary. Backend:
NCCL on CUDA (one GPU per rank, ``cuda:<LOCAL_RANK>``, selected before the process group starts),
gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


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
    """The world torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); a
    single process when it describes none. In a task of a submitit SLURM job with several tasks
    (``hydra/launcher=slurm`` with ``tasks_per_node`` or ``nodes`` above 1) submitit's description of
    the job's tasks is exported into those variables first (and ``MASTER_ADDR``/``MASTER_PORT``)."""
    if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        export_submitit_world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def export_submitit_world() -> None:
    """torch's ``env://`` variables from submitit's job environment, when the job has several tasks.
    Every GPU of the node stays visible: rank ``r`` takes ``cuda:<LOCAL_RANK>``."""
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # not a submitit task after all
        return
    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(world: World, device: torch.device) -> None:
    """Start the process group: NCCL bound to this rank's GPU (``torch.cuda.set_device`` first, so
    nothing of this rank lands on cuda:0), gloo on CPU."""
    if not world.active or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class TrainedModules(nn.Module):
    """Everything a stage trains, as one module whose ``forward(x, step)`` is the stage's training step.

    ``modules``: the model and the stage's extra modules; ``params``: the parameters the optimizer
    updates (those no module above holds are registered here too, e.g. an init stage's adapters).
    The stage calls its modules itself; DDP only needs them registered (its gradient hooks sit on
    the parameters) and its forward around the step.
    """

    def __init__(self, step: Callable, modules: list[nn.Module], params: list[nn.Parameter]) -> None:
        super().__init__()
        self._step = step
        self.parts = nn.ModuleList(modules)
        held = {id(p) for p in self.parts.parameters()}
        self.loose = nn.ParameterList([p for p in params if id(p) not in held])

    def forward(self, x: torch.Tensor, step):
        return self._step(x, step)


def data_parallel(step: Callable, modules: list[nn.Module], params: list[nn.Parameter], world: World,
                  sync_bn: bool = False) -> Callable:
    """``step`` itself in one process; under torchrun the DDP-wrapped :class:`TrainedModules`.

    Only ``params`` are reduced (a module's other parameters, e.g. a student an init stage does not
    train, are left out). ``find_unused_parameters``: a term may leave a trained parameter out of
    a step's graph; DDP then still completes the step. Buffers are broadcast from rank 0 when the
    wrapper is built (every stage starts equal on every rank) and not at each forward: the running
    statistics are averaged per epoch instead (:func:`average_norm_statistics`).
    """
    if not world.active or not any(p.requires_grad for p in params):
        return step
    trained = TrainedModules(step, modules, params)
    if sync_bn:
        trained = nn.SyncBatchNorm.convert_sync_batchnorm(trained)  # the adapters too (the models are already)
    keep = {id(p) for p in params}
    ignored = [f"{prefix}.{name}" for prefix, m in trained.named_modules()
               for name, p in m.named_parameters(recurse=False) if id(p) not in keep]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trained, ignored)
    return DistributedDataParallel(trained, find_unused_parameters=True, forward_sync_buffers=False)


def average_norm_statistics(modules: list[nn.Module], world: World) -> None:
    """Average the running mean and variance of every normalisation layer of ``modules`` over the
    ranks (one flat all-reduce). Other buffers (a term's per-sample memory) stay each rank's own."""
    if not world.active:
        return
    stats, seen = [], set()
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None and id(m) not in seen:
                seen.add(id(m))
                stats += [m.running_mean, m.running_var]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1).float() for s in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for s in stats:
        s.copy_(flat[offset : offset + s.numel()].view_as(s))
        offset += s.numel()


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    if not world.active:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
