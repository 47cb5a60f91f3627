"""Under DDP, check after every training epoch that all ranks hold the same state.

Prox steps, mask updates, DST rewiring, GrOWL phase changes and balancer updates all
run on every rank; if one of them used rank-local randomness or rank-local losses the
replicas would drift apart silently. One 8-byte digest per state tensor is gathered
from every rank and compared, which costs one small all_gather per epoch.
"""
from __future__ import annotations

import hashlib

import lightning as L
import torch
from torch import Tensor


class RankDivergenceError(RuntimeError):
    """Raised when DDP replicas no longer hold identical parameters/buffers."""


def state_digests(module: torch.nn.Module) -> tuple[list[str], Tensor]:
    """Names and int64 digests of every tensor in `module.state_dict()` (exact bytes)."""
    names, digests = [], []
    for name, value in module.state_dict().items():
        if not isinstance(value, Tensor):
            continue
        data = value.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"", digest_size=8)
        names.append(name)
        digests.append(int.from_bytes(digest.digest(), "little", signed=True))
    return names, torch.tensor(digests, dtype=torch.int64)


class RankConsistencyCheck(L.Callback):
    """Fail fast (naming the tensors) when DDP ranks diverge; a no-op on one process."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size <= 1:
            return
        names, local = state_digests(pl_module)
        gathered = pl_module.all_gather(local.to(pl_module.device))  # [world, n]
        differ = (gathered != gathered[0]).any(dim=0).nonzero().flatten().tolist()
        if differ:
            shown = ", ".join(names[i] for i in differ[:8])
            raise RankDivergenceError(
                f"epoch {trainer.current_epoch}: DDP ranks hold different values for {len(differ)} tensors "
                f"({shown}{', ...' if len(differ) > 8 else ''}); a rank-local random draw or loss entered an "
                f"update. Report this with the run's config")
