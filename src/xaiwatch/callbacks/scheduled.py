"""The schedule, rank and failure-isolation logic shared by xaiwatch's analysis callbacks."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter, resolve_adapter
from xaiwatch.callbacks.probes import tensorboard_writer
from xaiwatch.callbacks.validation import validate_choices, validate_positive
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.logging import XaiWriter

__all__ = ["ScheduledCallback"]


class ScheduledCallback(Callback):
    """Runs :meth:`_run` on global rank zero after every ``every_n_epochs``-th validation while fitting.

    The step of everything written is the number of completed training epochs (0 = before training, when
    ``run_at_start``). Nothing runs during the sanity check, ``fast_dev_run`` or outside ``fit``, and at most once
    per step. Exceptions are re-raised with ``on_error="raise"``, otherwise warned about (training continues).
    :meth:`_run` issues no collective operation, so running it on rank zero alone is safe.

    Args:
        every_n_epochs: run after every n-th training epoch's validation.
        run_at_start: also run before the first training epoch (step 0).
        on_error: ``"warn"`` or ``"raise"``.

    Raises:
        ConfigurationError: for ``every_n_epochs < 1`` or another ``on_error``.
    """

    def __init__(self, every_n_epochs: int = 1, run_at_start: bool = False, on_error: str = "warn") -> None:
        validate_positive(every_n_epochs=every_n_epochs)
        validate_choices(on_error=on_error)
        self.every_n_epochs = int(every_n_epochs)
        self.run_at_start = bool(run_at_start)
        self.on_error = on_error
        self._last_step = -1

    @abstractmethod
    def _run(self, pl_module: pl.LightningModule, step: int) -> None:
        """The work of one scheduled step (rank zero only)."""

    def _connect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> DetectorAdapter:
        """At ``setup()``: the TensorBoard writer (rank zero; others get ``None``) and the model's adapter.

        Raises:
            ConfigurationError: without a TensorBoard logger.
            UnsupportedModelError: when no adapter can be found (the message says the three ways to give one).
        """
        name = type(self).__name__
        self._writer = XaiWriter(tensorboard_writer(trainer, name)) if trainer.is_global_zero else None
        return resolve_adapter(pl_module, getattr(self, "adapter", None))

    def _require_setup(self, *resolved: object) -> None:
        if any(r is None for r in resolved):
            raise ConfigurationError(f"{type(self).__name__} was not set up; it runs inside `Trainer.fit`.")

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        from pytorch_lightning.trainer.states import TrainerFn

        return bool(trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_at_start and not self._should_skip(trainer) and trainer.current_epoch == 0:
            self._run_safely(trainer, pl_module, step=0)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        step = trainer.current_epoch + 1
        if step % self.every_n_epochs == 0:
            self._run_safely(trainer, pl_module, step=step)

    def _run_safely(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if step == self._last_step:  # several validations in one epoch: once
            return
        self._last_step = step
        if trainer.is_global_zero:
            self._safely(lambda: self._run(pl_module, step), f"step {step}")

    def _safely(self, fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"{type(self).__name__} failed at {what} ({type(err).__name__}: {err}); training continues.")
