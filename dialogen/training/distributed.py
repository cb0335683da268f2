"""torchrun awareness: rank, world size and device, with gloo on CPU and nccl on GPU.

Under `torchrun --nproc_per_node N -m dialogen train ...` the launcher sets RANK, WORLD_SIZE
and LOCAL_RANK; a plain run is rank 0 of a world of 1 and touches no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over all ranks (a copy)."""
        t = t.detach().clone()
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup(use_gpu: bool = True) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = use_gpu and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if gpu else torch.device("cpu")
    if world == 1:
        return Dist(0, 1, device)
    if gpu:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown(d: Dist):
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
