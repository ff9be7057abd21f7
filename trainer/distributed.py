"""Data-parallel training over ``torch.distributed`` (docs/sae-math.md, "Data-parallel statistics").

Every rank holds a full copy of the SAE, its optimiser and its latent statistics, and reads its
own ``B / world_size`` rows of each global batch of ``B`` (the loader's ``rank``/``world_size``
sharding). What keeps the ranks identical, and equal to a 1-process run with batch ``B``:

* gradients are averaged over the ranks after ``backward`` (:meth:`ProcessGroup.average_grads`,
  an all-reduce per parameter: the mean DDP computes);
* every statistic of the *global* batch is reduced, never a rank's own: the total variance the
  TopK loss divides by, the firing mask and row count of dead-latent tracking (and so AuxK), and
  the dyncorr statistics, for which each rank all-gathers every rank's TopK ``(idx, val)``
  (``B x k`` each) and computes ``m_t``, ``Q_t``'s non-zeros, ``mu`` and ``M`` itself;
* every decision is taken together: a non-finite loss anywhere skips the step everywhere, a
  signal on any rank stops every rank at the same step.

:class:`Collective` is the one-process case (every operation the identity) and the default of
``Trainer`` and ``SAE``, so single-process code paths are the plain ones.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from actcache.device import resolve_device
from actcache.errors import ActcacheError


class Collective:
    """One process: every reduction is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, name: str) -> torch.device:
        """This rank's device for ``--device name``."""
        return resolve_device(name)

    # -- batch statistics (used by the SAEs) -----------------------------------------------
    def batch_total_var(self, x: Tensor) -> Tensor:
        """``sum_b ||x_b - mean(x)||^2`` over the global batch, divided by ``world_size``: a
        rank's sum of squares over it then averages (over the ranks) to the global ratio."""
        c = x - x.mean(0)
        return torch.dot(c.view(-1), c.view(-1))  # one pass, no squared temporary

    def gather_rows(self, t: Tensor) -> Tensor:
        """Every rank's rows of ``t`` in rank order (the global batch); this rank's keep autograd."""
        return t

    def own_rows_grad(self, loss: Tensor) -> Tensor:
        """``loss`` (a function of the global batch, the same on every rank) with its gradient
        scaled by ``world_size``: averaged over the ranks, each differentiating through its own
        rows only, the gradient is the 1-process one. The forward value is unchanged."""
        return loss

    def any_rows(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a bool tensor over the ranks."""
        return mask

    # -- the training loop -------------------------------------------------------------------
    def sum(self, t: Tensor) -> Tensor:
        return t

    def all_true(self, flag: bool | Tensor) -> bool:
        return bool(flag)

    def any_true(self, flag: bool) -> bool:
        return bool(flag)

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        pass

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass


LOCAL = Collective()


class ProcessGroup(Collective):
    """The default ``torch.distributed`` process group (gloo on CPU, nccl on CUDA)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def device_for(self, name: str) -> torch.device:
        return self.device  # chosen by session() from the same --device: cuda:LOCAL_RANK or cpu

    def batch_total_var(self, x: Tensor) -> Tensor:
        n = x.shape[0] * self.world_size  # every rank's batch has the same size
        mean = self.sum(x.sum(0)) / n
        c = x - mean
        return self.sum(torch.dot(c.view(-1), c.view(-1))) / self.world_size

    def gather_rows(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        parts[self.rank] = t
        return torch.cat(parts)

    def own_rows_grad(self, loss: Tensor) -> Tensor:
        const = loss.detach()
        return const + self.world_size * (loss - const)

    def any_rows(self, mask: Tensor) -> Tensor:
        return self.sum(mask.to(torch.int32)) > 0

    def sum(self, t: Tensor) -> Tensor:
        t = t.detach().to(self.device, copy=True)
        dist.all_reduce(t)
        return t

    def all_true(self, flag: bool | Tensor) -> bool:
        return not self.any_true(not bool(flag))

    def any_true(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        # In place, one all-reduce per parameter (an SAE has four): no flattened copy of W_enc/W_dec.
        for p in params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def env_world_size() -> int:
    """The world size torchrun announced (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def session(device: str) -> Iterator[Collective]:
    """The collective of this process: :data:`LOCAL` outside torchrun; inside it, the default
    process group (created here, destroyed on exit), gloo on CPU, nccl on CUDA with one GPU per
    local rank (``device_for`` then gives ``cuda:LOCAL_RANK``)."""
    world = env_world_size()
    dev = resolve_device(device)
    if world == 1:
        yield LOCAL
        return
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ActcacheError("WORLD_SIZE is set but RANK is not: launch with torchrun or sae train --nproc N") from None
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ActcacheError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                "use --nproc <= the number of GPUs, or --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    try:
        yield ProcessGroup(rank, world, dev)
        if created:  # leave together: no rank tears its gloo threads down while the other still talks to it
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
