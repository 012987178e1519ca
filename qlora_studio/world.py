"""This process's place among a run's processes, and the few things they must agree on.

torchrun (or `accelerate launch`) starts the processes and sets RANK, LOCAL_RANK, WORLD_SIZE and
LOCAL_WORLD_SIZE; accelerate (through the Trainer) joins them into a process group (NCCL on GPUs, gloo on
the CPU). A run of one process is a `World` of size 1 whose collectives return their input.

The collectives here are tiny (a few integers per optimizer step): every process must take the same
decision at the same step -- to stop, to evaluate, to save -- or they would wait for each other forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

LAUNCHER_ENV = "QLORA_STUDIO_LAUNCHER_PID"  # set by `launcher`: the studio process that owns the run


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    launcher_pid: int | None = None  # the studio process holding the run lock, when it launched us

    @property
    def main(self) -> bool:
        """The process that writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, env=None) -> "World":
        env = os.environ if env is None else env

        def num(key, default):
            try:
                return int(env.get(key, default))
            except ValueError:
                return default

        size = num("WORLD_SIZE", 1)
        pid = num(LAUNCHER_ENV, 0)
        return cls(rank=num("RANK", 0), local_rank=num("LOCAL_RANK", 0), size=size,
                   local_size=num("LOCAL_WORLD_SIZE", size), launcher_pid=pid or None)

    # -- collectives (no-ops for one process)
    def _device(self):
        import torch

        if torch.distributed.get_backend() == "nccl":  # NCCL alone: CUDA tensors (a "cpu:gloo" part takes CPU ones)
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _ready(self) -> bool:
        import torch.distributed as dist

        return self.multi and dist.is_available() and dist.is_initialized()

    def all_max(self, values: list[int]) -> list[int]:
        """Each value's maximum over the processes (a flag any one of them raised)."""
        if not self._ready():
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def from_main(self, values: list[int]) -> list[int]:
        """Rank 0's values, on every process (rank 0 decides, the others follow)."""
        if not self._ready():
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        dist.broadcast(t, src=0)
        return [int(v) for v in t.tolist()]

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self._ready():
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._ready():
            import torch.distributed as dist

            dist.barrier()


def adapter_digest(model) -> str:
    """sha256 of the trainable weights (the adapters), by name: equal on every process of a DDP run."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda np: np[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
