"""Local rows against global columns across a process group (open_clip's local loss with
gather-with-grad): each rank keeps its own embeddings as rows and gathers every rank's as columns,
with autograd, so that the gradients flowing back to each rank's embeddings are exactly those of the
loss on the concatenated batch. Counts used by the reductions are summed over the group."""

from __future__ import annotations

import torch


class Group:
    def __init__(self, fn: str, process_group):
        self.active = process_group is not None
        self.group = process_group
        if not self.active:
            return
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"fastloss.{fn}: 'process_group' was given but torch.distributed is not initialized")
        self.dist = dist
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)

    def _sizes(self, local: int) -> list[int]:
        size = torch.tensor([local], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size, group=self.group)
        return [int(s) for s in sizes]

    def rank_offset(self, local_rows: int) -> int:
        """Where this rank's rows start among the gathered columns."""
        return sum(self._sizes(local_rows)[: self.rank])

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed.nn.functional as dist_nn

        sizes = self._sizes(t.shape[0])
        if len(set(sizes)) != 1:
            raise ValueError(f"fastloss.metric: every rank needs the same batch size with a process group, got {sizes}")
        return torch.cat(dist_nn.all_gather(t.contiguous(), group=self.group), dim=0)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def sum_int(self, value: int) -> int:
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        self.dist.all_reduce(t, group=self.group)
        return int(t)

    def sum_float(self, value) -> float:
        value = float(value)
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        self.dist.all_reduce(t, group=self.group)
        return float(t)
