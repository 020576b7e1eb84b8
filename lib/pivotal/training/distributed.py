"""Data-parallel training over several processes, as ``torchrun`` / ``accelerate launch`` start them.

No home-made launcher: the launchers set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``, and :func:`from_environment` joins the ``torch.distributed`` process group they
describe (NCCL on CUDA, gloo on CPU). The scheme keeps every process's trainer identical:

* every process draws the *global* batch's order, timesteps and noise from the same seeded
  generator, and trains its contiguous shard of the batch (:meth:`DataParallel.shard`);
* each shard's loss is its samples' share of the global mean (sum / global batch), so summing the
  gradients of all processes (one all-reduce over the LoRA and embedding gradients) gives exactly
  the single-process gradient of the global batch, whatever the shard sizes (buckets make small
  batches; a process may get no sample and contributes zeros);
* decisions are collective: a non-finite loss anywhere skips the step everywhere, and an interrupt
  in any process stops all at the same step;
* only rank 0 writes (bundles, resume files, previews) and reports progress.

So the parameters, optimizer states and random streams of all processes stay equal, and a resume
file written by rank 0 resumes every process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from pivotal.errors import ConfigError


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group: ``rank`` of ``world`` (``local_rank`` on its
    machine, which picks its GPU)."""

    rank: int
    world: int
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Whether this process writes files and reports progress (rank 0)."""
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This process's contiguous part of ``count`` samples: sizes differ by at most one and
        lower ranks get the extra samples, so rank 0 always has one when ``count`` >= 1."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) ``tensors`` in place, as one flat buffer per dtype and device."""
        import torch.distributed as dist

        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for members in groups.values():
            flat = torch.cat([t.reshape(-1) for t in members])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in members:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of the trainable ``params`` over all processes (a missing gradient,
        from a process that had no sample, counts as zeros)."""
        grads = []
        for p in params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if grads:
            self.sum_(grads)

    def total(self, value: float) -> float:
        """The sum of ``value`` over all processes (fp64 on CPU, exact for a handful of addends)."""
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        self.sum_([t])
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true in any process."""
        return self.total(1.0 if flag else 0.0) > 0

    def largest(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum of ``values`` over all processes."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo CPU ones.
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def launched_world_size() -> int:
    """``WORLD_SIZE`` as a launcher set it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number; start several "
                          "processes with torchrun or accelerate launch") from None


def launched_rank() -> int:
    """``RANK`` as a launcher set it (0 when absent: a single process)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def from_environment(device: torch.device | None = None) -> DataParallel | None:
    """The data-parallel group this process was launched into, or None for a single process.

    Joins the process group when the launcher has not (torchrun leaves that to the program;
    accelerate's launcher too): NCCL when ``device`` is CUDA, else gloo. ConfigError naming the
    variables when the launch environment is incomplete.
    """
    world = launched_world_size()
    if world <= 1:
        return None
    import torch.distributed as dist

    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the processes with "
                          "torchrun --nproc-per-node N -m pivotal train ... or accelerate launch")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        # One group per process, for every run it trains (a queue trains several); ended at exit.
        atexit.register(_destroy_group)
    return DataParallel(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> str | None:
    """The GPU of this process in a multi-process launch (``cuda:LOCAL_RANK``), else None."""
    if launched_world_size() > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None
