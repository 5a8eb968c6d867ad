"""Data-parallel training across processes (``torchrun``): every process trains on its own shard of
both data streams, and gradients are averaged over processes after each backward pass.

UnCoL's iterations call the student's ``forward_features``/``decode`` and also train modules outside
the student (the distillation projections and knowledge adapter), so wrapping the network in
``DistributedDataParallel`` would bypass DDP's forward and leave those modules unsynchronised. This
handler does what DDP's reducer does, for every parameter the optimiser updates: one all-reduce of
the flattened gradients, then division by the world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AverageGradients:
    """Average gradients over processes after backward; start every process from rank 0's weights.

    Args:
        optimizer: its parameters' gradients are averaged (a missing gradient counts as zeros, so
            every process reduces the same tensors in the same order).
        modules: modules whose parameters and buffers are broadcast from rank 0 when the engine starts.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, modules: Sequence[nn.Module] = ()) -> None:
        self.optimizer = optimizer
        self.modules = list(modules)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def broadcast(self, engine: Engine | None = None) -> None:
        if not _distributed():
            return
        for module in self.modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        if not _distributed():
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)


def rank_zero_only(handlers: Sequence, is_rank0: bool, kinds: Sequence[str] = ()) -> list:
    """``handlers`` without those whose class or a base class is named in ``kinds`` unless this is rank 0
    (logging, progress bars and checkpoint writing happen once, not once per process)."""
    return [
        h for h in handlers if h is not None and (is_rank0 or not {c.__name__ for c in type(h).__mro__} & set(kinds))
    ]
