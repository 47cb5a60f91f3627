"""MultiTaskModule: one LightningModule for every model × balancer × sparsity method.

It owns the training step (task losses → balancer → backward), calls the sparsity
method's hooks at fixed points (after each optimizer step; at the end of each training
epoch, before validation and checkpointing), and logs task and sparsity metrics. The
method's and balancer's fit/epoch hooks get a `TrainingState`, never this module; events
a method announces on it go to the balancer's handler (`PhaseStarted` → `on_phase_started`).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer
from mtlsparse.errors import NonFiniteLossError
from mtlsparse.memory_format import MEMORY_FORMATS, check_memory_format
from mtlsparse.metrics.dense import check_reference, delta_m
from mtlsparse.metrics.sparsity import group_sparsity, param_sparsity
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.base import SparsityMethod
from mtlsparse.training_state import Event, PhaseStarted, TrainingState

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
log = logging.getLogger(__name__)
EVAL_SPLITS = ("val", "test")


class MultiTaskModule(L.LightningModule):
    """Trains `model` on all its tasks with `balancer`, sparsified by `method`.

    `val/select` (higher is better) ranks checkpoints: the mean of the tasks' selection
    metrics (accuracy for classification, mIoU) when all are higher-is-better; with
    `reference` (single-task numbers, {'task/metric': value}) it is `val/delta_m`; for mixed
    directions without a reference (e.g. mIoU with depth error) it is Δm of the selection
    metrics against their values at the first validation, so no metric's scale dominates.
    Minus a large penalty per point of `sparsity/param` below `min_sparsity` (or the method's
    own floor, e.g. GrOWL's s_min, whichever is larger), so an epoch under the floor never
    beats one above it. `{split}/delta_m` is logged whenever `reference` is given.
    """

    def __init__(self, model: MultiTaskModel, balancer: Balancer, method: SparsityMethod,
                 optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 min_sparsity: float = 0.0, reference: Mapping | None = None,
                 memory_format: str = "contiguous") -> None:
        super().__init__()
        self.memory_format = check_memory_format(memory_format)
        self.model, self.balancer, self.method = model, balancer, method
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.min_sparsity = min_sparsity
        self.method.setup(model)
        self.balancer.setup(model)
        self.tasks = model.tasks
        self.task_metrics = nn.ModuleDict(
            {split: nn.ModuleDict({name: t.metrics() for name, t in self.tasks.items()}) for split in EVAL_SPLITS})
        self._shared_params = list(model.shared_parameters())
        self._metric_modes = {f"{n}/{m}": mode for n, t in self.tasks.items() for m, mode in t.metric_modes.items()}
        self.reference = check_reference(reference, self._metric_modes)
        self._selection = {f"{n}/{t.selection_metric[0]}": t.selection_metric[1] for n, t in self.tasks.items()}
        if not self.reference and "min" in self._selection.values():
            # selection metrics at the first validation, the scale of each (a buffer: checkpoints keep it)
            self.register_buffer("select_reference", torch.full((len(self._selection),), float("nan")))
        self._epoch_hooks_done = -1
        self.samples_seen = 0
        self.train_seconds = 0.0
        self._epoch_t0 = 0.0
        self._pending_rng: dict[str, Any] | None = None
        self._total_steps: float | None = None  # optimizer steps of the run, estimated when a hook asks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model(x)

    def setup(self, stage: str) -> None:
        """Lay the conv weights out in `memory_format` before the optimizer's state is made from them."""
        if self.memory_format == "contiguous":
            return
        if not any(p.dim() == 4 for p in self.model.parameters()):
            log.warning("memory_format=%s has no effect: the model has no convolution weights", self.memory_format)
        self.model.to(memory_format=MEMORY_FORMATS[self.memory_format])  # parameters keep their identity

    def _in_layout(self, x: Tensor) -> Tensor:
        """An image batch in `memory_format` too, so every conv runs in one layout."""
        if self.memory_format != "contiguous" and x.dim() == 4:
            return x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
        return x

    # ----------------------------------------------------------------- steps
    def _outputs(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Task outputs, and the shared representation z when the balancer differentiates w.r.t. it."""
        x = self._in_layout(x)
        if self.balancer.needs_representation:
            z = self.model.encode(x)
            return self.model.decode(z), z
        return self.model(x), None

    def _losses(self, out: dict[str, Tensor], y: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: t.loss(out[name], y[name]) for name, t in self.tasks.items()}

    def training_step(self, batch: tuple[Tensor, dict[str, Tensor]], batch_idx: int) -> Tensor:
        x, y = batch
        out, rep = self._outputs(x)
        losses = self._losses(out, y)
        penalty = self.method.penalty() if self.balancer.uses_penalty else None
        ctx = BalanceContext(self._shared_params, rep)
        loss = self.balancer(losses, penalty, ctx)
        aux = self.model.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
            self.log("train/aux_loss", aux.detach(), on_step=False, on_epoch=True, batch_size=x.shape[0],
                     sync_dist=True)
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, losses, penalty)
        self.samples_seen += x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log_dict({f"train/{n}/loss": v.detach() for n, v in losses.items()}, on_step=False, on_epoch=True,
                      batch_size=x.shape[0], sync_dist=True)
        return loss

    def _raise_non_finite(self, loss: Tensor, losses: dict[str, Tensor], penalty: Tensor | None) -> None:
        task_losses = {n: float(v) for n, v in losses.items()}
        raise NonFiniteLossError(
            f"non-finite training loss {float(loss)} at global step {self.global_step} (epoch {self.current_epoch}): "
            f"task losses {task_losses}, sparsity objective {None if penalty is None else float(penalty)}, "
            f"balancer state {self.balancer.state_summary()}. Checkpoints saved so far are kept; "
            "lower optimizer.lr, lam or k0, or check the data for NaNs.")

    def _eval_step(self, split: str, batch: tuple[Tensor, dict[str, Tensor]]) -> None:
        x, y = batch
        out = self.model(self._in_layout(x))
        for name, loss in self._losses(out, y).items():
            self.log(f"{split}/{name}/loss", loss, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
            self.task_metrics[split][name].update(out[name], y[name])

    def validation_step(self, batch: tuple[Tensor, dict[str, Tensor]], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[Tensor, dict[str, Tensor]], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_epoch_metrics(self, split: str) -> None:
        values: dict[str, float] = {}
        for name in self.tasks:
            computed = self.task_metrics[split][name].compute()
            self.task_metrics[split][name].reset()
            values.update({f"{split}/{name}/{k}": float(v) for k, v in computed.items()})
        accs = [v for k, v in values.items() if k.endswith("/acc")]
        if accs:
            values[f"{split}/mean_acc"] = sum(accs) / len(accs)
            values[f"{split}/worst_acc"] = min(accs)  # the min-max papers' criterion
        if self.reference:
            current = {k: values[f"{split}/{k}"] for k in self.reference}
            values[f"{split}/delta_m"] = delta_m(current, self.reference, self._metric_modes)
        sparsity = self.sparsity_summary()
        if split == "val":
            score = self._selection_score(values)
            # below the sparsity floor an epoch can't beat one above it; closer to the floor ranks higher
            floor = max(self.min_sparsity, self.method.min_sparsity)
            values["val/select"] = score - 1e3 * max(0.0, floor - sparsity["sparsity/param"])
            if not self.trainer.sanity_checking:
                self.method.on_validated(self.training_state(), score, sparsity["sparsity/param"])
        # torchmetrics already reduced these over DDP ranks, and sparsity is identical on every rank
        # (RankConsistencyCheck): the sync is a no-op mean that keeps Lightning's DDP logging consistent
        self.log_dict({**values, **sparsity}, prog_bar=False, sync_dist=True)

    def _selection_score(self, values: dict[str, float]) -> float:
        """Higher-is-better checkpoint score before the sparsity-floor penalty (see the class docstring)."""
        if self.reference:
            return values["val/delta_m"]
        current = {k: values[f"val/{k}"] for k in self._selection}
        if "min" not in self._selection.values():
            return sum(current.values()) / len(current)
        if torch.isnan(self.select_reference).all():
            self.select_reference.copy_(torch.tensor(list(current.values())))
        return delta_m(current, dict(zip(current, self.select_reference.tolist())), self._selection)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def sparsity_summary(self) -> dict[str, float]:
        """Parameter and channel-group sparsity (%) of the method's prunable layers."""
        weights = [layer.weight.detach() for layer in self.method.layers]
        return {"sparsity/param": param_sparsity(weights),
                "sparsity/group": group_sparsity(self.method.channel_groups())}

    # ------------------------------------------------------------ sparsity hooks
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.method.after_optimizer_step(getattr(optimizer, "optimizer", optimizer))

    def on_fit_start(self) -> None:
        state = self.training_state()
        self.method.on_fit_start(state)
        self.balancer.on_fit_start(state)

    def training_state(self) -> TrainingState:
        """The declared view of this fit that the method's and balancer's hooks receive."""
        datamodule = getattr(self.trainer, "datamodule", None)
        shape = getattr(datamodule, "input_shape", None)
        return TrainingState(model=self.model, epoch=self.current_epoch, step=self.global_step,
                             max_epochs=self.trainer.max_epochs, steps_source=self._run_steps,
                             input_shape=None if shape is None else tuple(shape), device=self.device,
                             batch_source=self._train_batches, log=self._log_epoch, announce=self._announce)

    def _run_steps(self) -> float:
        if self._total_steps is None:
            self._total_steps = float(self.trainer.estimated_stepping_batches)
        return self._total_steps

    def _train_batches(self):
        """A fresh pass over the datamodule's training loader, batches on this module's device."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError("this sparsity method reads training batches: fit with a datamodule "
                               "(trainer.fit(module, datamodule=...))")
        return (move_data_to_device(batch, self.device) for batch in datamodule.train_dataloader())

    def _announce(self, event: Event) -> None:
        """Hand an event to the part that declared a handler for it."""
        if isinstance(event, PhaseStarted):
            if event.restart_optimizer:
                self._restart_optimization()
            self.balancer.on_phase_started(event)
        else:  # pragma: no cover - every Event type is dispatched above
            raise TypeError(f"no handler for event {event!r}")

    def _restart_optimization(self) -> None:
        """Fresh optimizer state and the lr schedule from its first epoch, over the epochs left (PhaseStarted)."""
        left = None if self.trainer.max_epochs in (None, -1) else max(1, self.trainer.max_epochs - self.current_epoch)
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()  # Adam's moments and step counts, SGD's momentum buffers
            for group in optimizer.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.last_epoch = 0
            if left is not None and hasattr(scheduler, "T_max"):
                scheduler.T_max = left  # a horizon-bound schedule (cosine) ends with the run again
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()
        self.method.on_train_epoch_start(self.training_state())

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.trainer.is_last_batch:
            self._end_of_training_epoch()

    def on_train_epoch_end(self) -> None:
        self._end_of_training_epoch()  # no-op when the last batch already ran it

    def _end_of_training_epoch(self) -> None:
        """Epoch-end work, run once per epoch before validation so checkpoints see its effect."""
        if self._epoch_hooks_done == self.current_epoch:
            return
        self._epoch_hooks_done = self.current_epoch
        self.train_seconds += time.perf_counter() - self._epoch_t0
        state = self.training_state()
        self.model.on_train_epoch_end(state)  # an architecture that changes (LTB fixes its branching) goes first
        self.method.on_train_epoch_end(state)
        if self.method.dead_tol > 0:  # the dead-row rule: numerically dead groups/units become exact zeros
            snapped = self.method.snap_dead_()
            self._log_epoch({"sparsity/dead_groups_zeroed": float(snapped.groups),
                             "sparsity/dead_units_zeroed": float(snapped.units)})
        self.balancer.on_train_epoch_end(state)
        self._log_epoch({f"balancer/{k}": v for k, v in self.balancer.state_summary().items()})

    def _log_epoch(self, values: Mapping[str, float]) -> None:
        """Log epoch-level scalars (the epoch-end hooks' and the balancer's) once per epoch.

        The epoch-end work runs inside the last batch's hook, where Lightning's default is a
        step-level log that reaches metrics.csv only on a `log_every_n_steps` step; logging
        them as epoch values writes them at every epoch end.
        """
        if values:
            self.log_dict(dict(values), on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    # ------------------------------------------------------------------ resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what a resumed run needs to continue bit-identically: RNG streams and run counters.

        Checkpoints are written at epoch ends, after this epoch's hooks, so these states are
        exactly those the next epoch starts from.
        """
        checkpoint["mtlsparse"] = {
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch_hooks_done": self._epoch_hooks_done,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mtlsparse")
        if state is None:
            return
        self._epoch_hooks_done = state["epoch_hooks_done"]
        self.samples_seen = state["samples_seen"]
        self.train_seconds = state["train_seconds"]
        self._pending_rng = state["rng"]  # applied in on_train_start, after fit-start hooks used the RNG

    def on_train_start(self) -> None:
        if self._pending_rng is None:
            return
        rng, self._pending_rng = self._pending_rng, None
        torch.set_rng_state(rng["torch"])
        _set_numpy_rng_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        groups = [{"params": list(self.model.parameters())}]
        balancer_params = list(self.balancer.parameters())
        if balancer_params:
            groups.append({"params": balancer_params})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}


def _numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and ints (checkpoints load with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))
