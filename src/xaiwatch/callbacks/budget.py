"""``TimeBudget``: keep xaiwatch's callbacks under a share of the fit's wall time.

A callback's cost per run is fixed (it depends on its probes, not on the dataset), so its share of training time
depends on how long an epoch is: small on a dataset whose epoch takes an hour, large on a 13-second demo epoch.
With a ``TimeBudget`` in ``Trainer(callbacks=...)``, every :class:`~xaiwatch.callbacks.ProbeCallback` asks it
before a scheduled run and skips the run when it would put xaiwatch's total over the budget; the time is counted
as it is spent (the run on the training thread and the drawing on the writer thread), so the share holds on any
hardware without tuning a schedule to it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from xaiwatch.core.validation import in_range

__all__ = ["TimeBudget", "clock", "find_budget"]


def clock() -> float:
    """The budget's clock (``time.perf_counter``; a test replaces it)."""
    return time.perf_counter()


class TimeBudget(Callback):
    """The most of the fit's wall time xaiwatch's scheduled runs may take.

    A scheduled run of a callback is allowed when xaiwatch's seconds so far plus that callback's last run cost
    stay within ``share`` of the fit's elapsed wall time; a callback's first run is always allowed (its cost is
    not known yet, and step 0 is where the story starts). Runs outside the schedule (``run_now``,
    ``trainer.validate`` / ``trainer.test``) and the end-of-fit pictures are never skipped but are counted.
    Callbacks named in ``exempt`` always run: by default the :class:`~xaiwatch.callbacks.SaliencyGate`, because
    :class:`~xaiwatch.callbacks.GatedModelCheckpoint` saves only steps the gate decided. Under DDP the decision is
    taken on rank zero and broadcast, so every rank runs or skips alike. The ledger is saved in checkpoints, so a
    resumed fit keeps the share over the whole training.

    Args:
        share: the budget as a share of wall time, in ``(0, 1)`` (``0.1``: at most about 10%).
        exempt: class names of callbacks that are never skipped (their time still counts).

    Raises:
        ConfigurationError: for a share outside ``(0, 1)``.

    Example:
        >>> budget = TimeBudget(share=0.1)
        >>> budget.spend("ExplainCallback", 2.0); budget.allows("ExplainCallback", elapsed=10.0)
        False
        >>> budget.allows("ExplainCallback", elapsed=40.0), budget.allows("ProjectionCallback", elapsed=10.0)
        (True, True)
    """

    def __init__(self, share: float = 0.1, exempt: tuple[str, ...] | list[str] = ("SaliencyGate",)) -> None:
        self.share = in_range("share", share, 0.0, 1.0, low_open=True, high_open=True)
        self.exempt = tuple(str(name) for name in exempt)
        self.spent = 0.0
        self.runs: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._elapsed_before = 0.0  # wall time of earlier (resumed) fits
        self._start: float | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------- ledger
    def elapsed(self) -> float:
        """Wall seconds of the fit so far (earlier fits of a resumed run included)."""
        now = 0.0 if self._start is None else clock() - self._start
        return self._elapsed_before + now

    def spend(self, name: str, seconds: float) -> None:
        """Count ``seconds`` of work of the callback class ``name`` (thread-safe: the writer thread calls it)."""
        with self._lock:
            self.spent += float(seconds)
            self._last[name] = self._last.get(name, 0.0) + float(seconds)

    def allows(self, name: str, elapsed: float | None = None) -> bool:
        """Whether a scheduled run of ``name`` fits: spent + its last cost <= share x elapsed (first run: yes)."""
        if name in self.exempt or name not in self._last:
            return True
        elapsed = self.elapsed() if elapsed is None else float(elapsed)
        return self.spent + self._last[name] <= self.share * elapsed

    def decide(self, trainer: pl.Trainer, name: str) -> bool:
        """:meth:`allows` on rank zero, broadcast (every rank calls it at the same scheduled step); counted."""
        allowed = self.allows(name) if trainer.is_global_zero else True
        if trainer.world_size > 1:
            allowed = bool(trainer.strategy.broadcast(allowed, src=0))
        book = self.runs if allowed else self.skipped
        book[name] = book.get(name, 0) + 1
        if allowed:
            with self._lock:
                self._last[name] = 0.0  # the run's cost is summed as it is spent
        return allowed

    def summary(self) -> dict[str, Any]:
        """Seconds spent, elapsed, the share, and runs / skipped runs per callback."""
        elapsed = self.elapsed()
        return {
            "spent_seconds": self.spent,
            "elapsed_seconds": elapsed,
            "share": self.spent / elapsed if elapsed > 0 else float("nan"),
            "budget": self.share,
            "runs": dict(self.runs),
            "skipped": dict(self.skipped),
        }

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = clock()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = self.summary()
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
        rank_zero_info(
            f"TimeBudget: xaiwatch took {s['spent_seconds']:.1f} s of {s['elapsed_seconds']:.1f} s "
            f"({s['share']:.1%}, budget {self.share:.0%}); runs skipped to keep it: {skipped}."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "spent": self.spent,
            "elapsed": self.elapsed(),
            "last": dict(self._last),
            "runs": dict(self.runs),
            "skipped": dict(self.skipped),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.spent = float(state_dict.get("spent", 0.0))
        self._elapsed_before = float(state_dict.get("elapsed", 0.0))
        self._last = {str(k): float(v) for k, v in state_dict.get("last", {}).items()}
        self.runs = {str(k): int(v) for k, v in state_dict.get("runs", {}).items()}
        self.skipped = {str(k): int(v) for k, v in state_dict.get("skipped", {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # ddp_spawn pickles callbacks; a lock does not travel
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def find_budget(trainer: pl.Trainer) -> TimeBudget | None:
    """The trainer's :class:`TimeBudget`, if any (Lightning itself refuses two: they share a state key)."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, TimeBudget)), None)
