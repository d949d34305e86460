"""TimeBudget: xaiwatch's scheduled runs stay within a share of the fit's wall time (on a fake clock)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from helpers import make_trainer, tiny_module
from xaiwatch.callbacks import ProbeCallback, ShareRecord, TimeBudget
from xaiwatch.callbacks import budget as budget_module
from xaiwatch.core.errors import ConfigurationError

BATCH_SECONDS, RUN_SECONDS = 1.0, 2.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticks(pl.Callback):
    """Each training batch takes BATCH_SECONDS of the fake clock (listed first: before the probe callbacks)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args) -> None:
        self.clock.now += BATCH_SECONDS


class Costly(ProbeCallback):
    """A probe callback whose run takes RUN_SECONDS of the fake clock; records the steps it ran at."""

    def __init__(self, clock: FakeClock, **kwargs) -> None:
        super().__init__(num_probe=1, every_n_epochs=None, every_n_train_steps=1, on_error="raise", **kwargs)
        self.clock, self.steps = clock, []
        self.background = False

    def _run(self, share, ctx):
        self.clock.now += RUN_SECONDS
        self.steps.append(ctx.step)
        return ShareRecord([(p,) for p in share])


def simulate(share: float, steps: int) -> list[int]:
    """The rule written out independently: run at step s when spent + last cost <= share x elapsed."""
    t, spent, ran = 0.0, 0.0, []
    for step in range(1, steps + 1):
        t += BATCH_SECONDS
        if not ran or spent + RUN_SECONDS <= share * t:
            ran.append(step)
            t += RUN_SECONDS
            spent += RUN_SECONDS
    return ran


@pytest.mark.parametrize("share", [0.4, 0.6])
def test_runs_are_skipped_to_stay_within_the_share(tmp_path, square_loaders, monkeypatch, share):
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "clock", clock)
    cb, budget = Costly(clock), TimeBudget(share=share)
    trainer = make_trainer(tmp_path, [Ticks(clock), cb, budget], epochs=6, limit_val_batches=0)
    trainer.fit(tiny_module(), *square_loaders)
    assert cb.steps == simulate(share, 12)
    assert 1 < len(cb.steps) < 12  # some ran, some were skipped
    summary = budget.summary()
    assert summary["spent_seconds"] == RUN_SECONDS * len(cb.steps)
    assert summary["runs"] == {"Costly": len(cb.steps)} and summary["skipped"] == {"Costly": 12 - len(cb.steps)}
    assert summary["share"] <= share  # after the first run, which is always allowed, the budget holds


def test_exempt_callbacks_always_run_and_their_time_counts(tmp_path, square_loaders, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "clock", clock)
    cb, budget = Costly(clock), TimeBudget(share=0.25, exempt=["Costly"])
    trainer = make_trainer(tmp_path, [Ticks(clock), cb, budget], epochs=2, limit_val_batches=0)
    trainer.fit(tiny_module(), *square_loaders)
    assert cb.steps == [1, 2, 3, 4] and budget.spent == 4 * RUN_SECONDS and budget.skipped == {}


def test_the_ledger_survives_a_resume():
    budget = TimeBudget(share=0.1)
    budget.spend("ExplainCallback", 3.0)
    state = budget.state_dict()
    resumed = TimeBudget(share=0.1)
    resumed.load_state_dict(state)
    assert resumed.spent == 3.0 and resumed.elapsed() == pytest.approx(state["elapsed"])
    assert resumed.allows("ExplainCallback", elapsed=29.0) is False  # 3 + 3 > 0.1 x 29 ... until 60 s
    assert resumed.allows("ExplainCallback", elapsed=60.0) is True


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1])
def test_a_share_outside_zero_one_is_refused(share):
    with pytest.raises(ConfigurationError, match="share"):
        TimeBudget(share=share)


def test_two_budgets_are_refused(tmp_path, square_loaders):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `TimeBudget`"):
        trainer = make_trainer(tmp_path, [Costly(FakeClock()), TimeBudget(0.1), TimeBudget(0.2)], epochs=1)
        trainer.fit(tiny_module(), *square_loaders)


def test_writer_thread_runs_torch_serially_and_leaves_training_threads():
    """The writer thread's torch ops run on one thread (its own setting), training keeps its count. A parallel
    OpenMP team on the writer thread had made every later training step 55% slower on 2 cores."""
    import threading

    import torch

    cb = Costly(FakeClock())
    cb.background = True
    before = torch.get_num_threads()
    seen = {}

    def job():
        seen["name"] = threading.current_thread().name
        seen["threads"] = torch.get_num_threads()
        seen["sum"] = float(torch.arange(100_000, dtype=torch.float64).sum())

    cb._submit(job, "a test job")
    cb.flush()
    assert seen["name"].startswith("xaiwatch-Costly") and seen["threads"] == 1
    assert seen["sum"] == 100_000 * 99_999 / 2
    assert torch.get_num_threads() == before
