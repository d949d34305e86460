"""A 2-rank gloo fit with every probe callback, run by ``test_distributed.py`` in a subprocess (hard timeout).

Each rank writes ``rank<R>.json``: the probe positions it explained, the positions the gate evaluated at each
decision, the gate's history, a one-call evaluation of every probe on the final weights (the reference the
shared decision must equal) and the tracked objects, so the test can check that the work was shared, that the
ranks agree and that only rank zero wrote.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from conftest import SquaresDataset, collate  # noqa: E402
from helpers import square_sized, tiny_module  # noqa: E402
from xaiwatch.callbacks import ExplainCallback, SaliencyGate  # noqa: E402
from xaiwatch.callbacks.explain import ExplainCallback as _Explain  # noqa: E402
from xaiwatch.checks import CheckOptions  # noqa: E402


class Report(pl.Callback):
    """Writes ``rank<R>.json`` at the end of fit, in the process that trained (ddp_spawn's workers too)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, ExplainCallback))
        gate = next(c for c in trainer.callbacks if isinstance(c, SaliencyGate))
        evaluated = list(RecordingGate.evaluated)
        # every probe in one call on this rank, on the weights of the last decision (no step since)
        reference = gate.judge(gate.evaluate(positions=None))
        report = {
            "rank": trainer.global_rank,
            "seen": Recording.seen,
            "gate_evaluated": evaluated,
            "gate_reference": reference.to_dict(),
            "gate_last_verdict": gate.history[-1]["verdict"],
            "gate": [{k: r[k] for k in ("global_step", "passed", "values", "verdict")} for r in gate.history],
            "tracked": cb._tracked,
            "wrote": cb._writer is not None,
            "log_dir": str(cb.log_dir),
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class Recording(_Explain):
    """ExplainCallback that remembers which probe positions this rank explained."""

    seen: list[int] = []

    def _run(self, share, ctx):
        type(self).seen = sorted({*type(self).seen, *share})
        return super()._run(share, ctx)


class RecordingGate(SaliencyGate):
    """SaliencyGate that remembers the probe positions it evaluated at each decision on this rank."""

    evaluated: list = []

    def evaluate(self, pl_module=None, positions=None):
        type(self).evaluated = [
            *type(self).evaluated,
            list(range(len(self.indices))) if positions is None else positions,
        ]
        return super().evaluate(pl_module, positions=positions)


def main(out: str, strategy: str, devices: int) -> None:
    torch.set_num_threads(1)
    explain = Recording(methods=["saliency"], num_probe=4, on_error="raise")
    # the default checks (context_swap pastes each object onto other probes' images) on every probe (min_score 0)
    gate = RecordingGate(num_probe=4, options=CheckOptions(batch_size=2, min_score=0.0))
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=TensorBoardLogger(out, name="tb"),
        callbacks=[explain, gate, Report(out)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(SquaresDataset(16, 0), batch_size=4, collate_fn=collate)
    val = DataLoader(SquaresDataset(8, 3), batch_size=4, collate_fn=collate)  # probes with context donors
    trainer.fit(square_sized(tiny_module()), train, val)  # boxes that overlap the squares: context_swap defined


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
