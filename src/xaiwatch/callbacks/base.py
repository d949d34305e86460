"""``ProbeCallback``: the template every xaiwatch analysis callback is written on.

The base owns everything that is the same for every callback — the adapter and writer resolution, the probe set
(seeded choice, identity by content, ``state_dict``), the schedule (epochs and training steps, step 0 before
training, ``trainer.validate`` / ``trainer.test``), the split of the probes across ranks and the gather of the
results, failure isolation and the log folder, and runs the subclass's work inside one
:func:`~xaiwatch.core.context.explaining` context of the model — so that a subclass writes only:

- ``_run(share, ctx) -> record``: the work on this rank's share of the probes (a list of positions in the probe
  set), returning a small picklable record (typically a list with one entry per probe);
- ``_write(record, ctx)``: rank zero writes the merged record (TensorBoard, files);

and optionally ``_merge(records)`` (default: concatenate per-rank lists in probe order), ``_choose(dataset)``
(default: a seeded choice of ``num_probe`` images, those with boxes first), ``_on_record(trainer, record, ctx)``
(every rank, with the same merged record: for decisions) and ``_on_failure(trainer, reasons, ctx)``.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter, resolve_adapter
from xaiwatch.callbacks import budget as _budget
from xaiwatch.callbacks.capture import CapturedBatch, ValidationCapture
from xaiwatch.callbacks.probes import choose_probe_indices, load_probes, probe_item, stage_dataset, tensorboard_writer
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import ProbeSet
from xaiwatch.core.validation import choice, distinct_indices, optional_positive_int, positive_int
from xaiwatch.logging import XaiWriter

__all__ = ["ProbeCallback", "RunContext", "ShareRecord", "probe_key", "to_cpu"]

ON_ERROR = ("warn", "raise")


@dataclass(frozen=True)
class RunContext:
    """Where a scheduled run happens.

    Attributes:
        step: the TensorBoard step: ``trainer.global_step`` (0 = before training), Lightning's own x-axis.
        epoch: training epochs completed.
        stage: ``"fit"``, ``"validate"`` or ``"test"``.
        device: the model's device.
        rank: this process' global rank.
        world_size: number of processes.
    """

    step: int
    epoch: int
    stage: str
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def label(self) -> str:
        """``"epoch E | step S"`` for picture titles (``"validate | step S"`` outside fit)."""
        return f"epoch {self.epoch} | step {self.step}" if self.stage == "fit" else f"{self.stage} | step {self.step}"


@dataclass
class ShareRecord:
    """What one rank found on its share: ``(position, ...)`` items and the seconds it took.

    Attributes:
        items: one tuple per probe (or per object), starting with the probe's position in the probe set.
        seconds: wall time of the share (the merged record keeps the slowest rank's).
    """

    items: list[tuple] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Failed:
    """What a rank sends instead of a record when its share failed."""

    rank: int
    message: str


def _serial_torch() -> None:
    """The writer thread's torch ops run on that thread alone. A second thread that runs parallel torch ops gets an
    OpenMP team of its own; the idle team stays while the thread lives, so libgomp counts more threads than cores
    and makes the training thread's workers sleep between parallel regions instead of spinning: every training
    step after the first drawing was 55% slower (YOLOv8n, 160 px, batch 16, 2 cores: 195 -> 305 ms) at the same CPU
    time. ``torch.set_num_threads`` is per thread (OpenMP's and MKL's local setting), so training keeps its own."""
    torch.set_num_threads(1)


def probe_key(image: torch.Tensor, boxes: torch.Tensor) -> str:
    """A content key of a validation image and its boxes: the SHA-1 of the 8-bit image and the rounded boxes.

    Example:
        >>> key = probe_key(torch.zeros(3, 4, 4), torch.tensor([[0.0, 0, 2, 2]]))
        >>> key == probe_key(torch.zeros(3, 4, 4), torch.tensor([[0.0, 0, 2, 2]])), len(key)
        (True, 40)
    """
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy().tobytes()
    rounded = boxes.detach().float().cpu().round(decimals=1).numpy().tobytes()
    return hashlib.sha1(pixels + bytes(str(tuple(image.shape)), "ascii") + rounded).hexdigest()


class ProbeCallback(Callback):
    """Base of xaiwatch's callbacks: schedule, probes, ranks, failure isolation and state (see the module text).

    Args:
        every_n_epochs: run after every n-th training epoch's validation (``None``: not by epoch).
        every_n_train_steps: also run after every n-th optimiser step (``None``: not by step), so that a dataset
            whose epoch takes hours is still watched.
        run_at_start: also run before the first training step (step 0).
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred from the network.
        num_probe: probe images chosen (seeded) from the validation data, for subclasses that use the default
            :meth:`_choose`.
        probe_indices: explicit validation indices instead.
        seed: seed of the probe choice and of stochastic methods.
        outside_fit: run at the end of ``trainer.validate`` / ``trainer.test`` too (step = the loaded model's
            global step); otherwise say once that nothing is explained there.

    Raises:
        ConfigurationError: for invalid arguments.

    Example:
        A sixth callback: the mean detection score of each probe, written as a scalar per probe.

        >>> from xaiwatch.core.context import explaining
        >>> class MeanScore(ProbeCallback):
        ...     def _run(self, share, ctx):
        ...         images = self.probes.images[share].to(ctx.device)
        ...         with explaining(self._adapter.model):
        ...             dets = self._adapter.detect(images) if share else []
        ...         return ShareRecord([(p, float(d.scores.mean()) if len(d) else 0.0) for p, d in zip(share, dets)])
        ...
        ...     def _write(self, record, ctx):
        ...         for p, score in record.items:
        ...             self._writer.scalar(f"mean_score/probe_{p:02d}", score, ctx.step)
        >>> MeanScore(num_probe=4, every_n_train_steps=100).every_n_train_steps
        100
    """

    #: where the probe set's images come from outside fit (``"validate"`` reads the validate loop's data)
    _STAGES: ClassVar[tuple[str, ...]] = ("fit", "validate", "test")

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        run_at_start: bool = False,
        on_error: str = "warn",
        adapter: DetectorAdapter | None = None,
        num_probe: int | None = None,
        probe_indices: Sequence[int] | None = None,
        seed: int = 0,
        outside_fit: bool = True,
    ) -> None:
        self.every_n_epochs = optional_positive_int("every_n_epochs", every_n_epochs)
        self.every_n_train_steps = optional_positive_int("every_n_train_steps", every_n_train_steps)
        self.on_error = choice("on_error", on_error, ON_ERROR)
        self.run_at_start = bool(run_at_start)
        self.adapter = adapter
        if probe_indices is not None:
            probe_indices = distinct_indices("probe_indices", probe_indices)
            num_probe = len(probe_indices)
        self.num_probe = None if num_probe is None else positive_int("num_probe", num_probe)
        self.probe_indices = probe_indices
        self.seed = int(seed)
        self.outside_fit = bool(outside_fit)
        # state (state_dict)
        self._last_step = -1
        self._indices: list[int] | None = None
        self._keys: list[str] = []
        self._log_dirs: list[str] = []  # log folders of this and earlier (resumed) runs, oldest first
        self._restored_log_dirs: list[str] = []  # those of the checkpoint this fit resumed from (none: a fresh fit)
        # resolved at setup
        self._adapter: DetectorAdapter | None = None
        self._writer: XaiWriter | None = None
        self._dataset: Any = None
        self._probes: ProbeSet | None = None
        self._log_dir: Path | None = None
        self._disabled = False
        self._said_outside = False
        self._ran_at = -1  # the step this process last ran at (not restored: a new fit may start at step 0 again)
        self.background = True
        self._pool: Any = None
        self._futures: list[Any] = []
        self._pending: BaseException | None = None
        self._budget: Any = None  # the trainer's TimeBudget, found at setup
        self.reuse_validation = True  # subclasses with `_captures` take forward results from the validation pass
        self._capture: ValidationCapture | None = None
        self._captured: list[Any] = []  # records of `_consume`, for the run at this validation's end
        self._capture_epoch = 0

    # ------------------------------------------------------------------------------------ subclass seams
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: B027
        """Subclass setup after the adapter, writer and probes are resolved (engines, layers, extra checks)."""

    def _choose(self, dataset: Any) -> list[int]:
        """The validation indices to analyse (default: ``num_probe`` seeded images, those with boxes first)."""
        return choose_probe_indices(dataset, self.num_probe or 8, self.seed, type(self).__name__)

    @abstractmethod
    def _run(self, share: list[int], ctx: RunContext) -> Any:
        """The work on this rank's ``share`` (positions in the probe set); returns a picklable record."""

    def _merge(self, records: list[Any]) -> Any:
        """One record from every rank's records (rank order). Default: :class:`ShareRecord` items concatenated
        in probe order, the slowest rank's seconds; a record of another type is taken from rank zero."""
        if all(isinstance(r, ShareRecord) for r in records):
            items = sorted((item for r in records for item in r.items), key=lambda item: item[0])
            return ShareRecord(items, max(r.seconds for r in records))
        return records[0]

    def _write(self, record: Any, ctx: RunContext) -> None:  # noqa: B027
        """Rank zero writes the merged record."""

    def _on_record(self, trainer: pl.Trainer, record: Any, ctx: RunContext) -> None:  # noqa: B027
        """Every rank, with the same merged record (decisions such as the gate's)."""

    def _on_failure(self, trainer: pl.Trainer, reasons: list[str], ctx: RunContext) -> None:  # noqa: B027
        """Every rank, when a rank's share failed under ``on_error="warn"`` (already warned about)."""

    def _captures(self) -> dict[str, torch.nn.Module] | None:
        """The layers whose maps this callback takes from the validation pass before a scheduled run (``{}``: the
        candidates only), or ``None`` (default): it reads nothing from that pass (see :mod:`.capture`)."""
        return None

    def _consume(self, batch: CapturedBatch) -> Any:
        """A compact record of one validation batch's chosen images (subclasses with :meth:`_captures`); the run
        that follows finds the records in :attr:`_captured`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- setup
    @property
    def probes(self) -> ProbeSet:
        """The probe set (after ``setup()``)."""
        self._require_setup()
        if self._probes is None:
            self._probes = load_probes(self._dataset, self._indices, type(self).__name__)
        return self._probes

    @property
    def indices(self) -> list[int]:
        """Validation indices of the probe set (after ``setup()``)."""
        self._require_setup()
        return list(self._indices)

    @property
    def log_dir(self) -> Path | None:
        """The run's log folder, read once at ``setup()`` on every rank (reading it broadcasts)."""
        return self._log_dir

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        if stage not in self._STAGES:
            return
        if stage != "fit" and not self.outside_fit:
            rank_zero_info(f"{name}: `outside_fit=False`, so `trainer.{stage}` explains nothing.")
            return
        log_dir = trainer.log_dir  # a collective: every rank reads it, here, once
        self._log_dir = Path(log_dir or trainer.default_root_dir)
        if trainer.fast_dev_run:
            self._disabled = True
            rank_zero_info(f"{name}: `fast_dev_run` is on, so nothing is explained (Lightning replaces the logger).")
            return
        self._disabled = False
        self._budget = _budget.find_budget(trainer)
        self._writer = XaiWriter(tensorboard_writer(trainer, name)) if trainer.is_global_zero else None
        if self._writer is not None:  # the story layout and the `tensorboard` command keeping every picture
            self._writer.setup_run(self._samples_expected(trainer), logdir=self._log_dir.parent)
        self._adapter = resolve_adapter(pl_module, self.adapter)
        self._dataset = stage_dataset(trainer, stage, name)
        if self._indices is None:  # a fresh run (a resumed one restored them)
            self._indices = list(self.probe_indices) if self.probe_indices is not None else self._choose(self._dataset)
            outside = [i for i in self._indices if not 0 <= i < len(self._dataset)]
            if outside:
                self._indices = None
                raise ConfigurationError(
                    f"{name}: probe indices {outside} are outside the validation set (size {len(self._dataset)})."
                )
            self._keys = [self._key(i) for i in self._indices]
        else:
            self._relocate(name)
        self._probes = None
        if str(self._log_dir) not in self._log_dirs:
            self._log_dirs.append(str(self._log_dir))
        self._setup(trainer, pl_module, stage)
        if stage == "fit":
            self._warn_schedule(trainer, name)

    def _samples_expected(self, trainer: pl.Trainer) -> int | None:
        """Pictures per tag this run may write (TensorBoard must keep them all); ``None`` when unknown."""
        if self.every_n_train_steps is not None or trainer.max_epochs is None or trainer.max_epochs < 0:
            return None
        return int(trainer.max_epochs)

    def _key(self, index: int) -> str:
        image, boxes, _ = probe_item(self._dataset[index])
        return probe_key(image, boxes)

    def _relocate(self, name: str) -> None:
        """Check that restored probe indices still point at the same images; find them again if they moved."""
        if not self._keys:  # a checkpoint from before content keys: indices only
            return
        n = len(self._dataset)
        same = [0 <= i < n and self._key(i) == k for i, k in zip(self._indices, self._keys)]
        if all(same):
            return
        where = {}
        for j in range(n):
            where.setdefault(self._key(j), j)
        missing = [i for i, k in zip(self._indices, self._keys) if k not in where]
        if missing:
            raise ConfigurationError(
                f"{name}: the validation set changed since the checkpoint: {len(missing)} of the {len(self._keys)} "
                f"probe images (saved at indices {missing}) are no longer in it, so the resumed run cannot explain "
                "the same images. Resume with the original validation data, or start a fresh run (a new callback "
                "state) to choose new probes."
            )
        moved = [self._indices[p] for p, ok in enumerate(same) if not ok]
        self._indices = [where[k] for k in self._keys]
        rank_zero_warn(
            f"{name}: the validation set changed since the checkpoint; the probe images saved at indices {moved} "
            "were found again by content at their new indices, and are explained as before."
        )

    def _warn_schedule(self, trainer: pl.Trainer, name: str) -> None:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        never = self.every_n_train_steps is None and (
            self.every_n_epochs is None or (max_epochs is not None and self.every_n_epochs > max_epochs)
        )
        if never:
            when = "only before training (step 0)" if self.run_at_start else "never"
            rank_zero_warn(
                f"{name}: with `every_n_epochs={self.every_n_epochs}`, `every_n_train_steps=None` and "
                f"`max_epochs={trainer.max_epochs}` it runs {when}. Lower `every_n_epochs` or set `every_n_train_steps`."
            )
        if trainer.limit_val_batches == 0 and self.every_n_train_steps is None:
            rank_zero_warn(f"{name}: `limit_val_batches=0`, validation never runs, so nothing runs after step 0.")

    def _require_setup(self) -> None:
        if self._adapter is None or self._indices is None:
            raise ConfigurationError(f"{type(self).__name__} was not set up; it runs inside `Trainer.fit`.")

    # ------------------------------------------------------------------------------------------- hooks
    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(self._disabled or trainer.sanity_checking or self._adapter is None)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_at_start and not self._skip(trainer) and trainer.global_step == 0:
            self._scheduled(trainer, pl_module, epoch=0)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        n = self.every_n_train_steps
        if n and not self._skip(trainer) and trainer.global_step % n == 0 and trainer.global_step > 0:
            self._scheduled(trainer, pl_module, epoch=trainer.current_epoch)  # epochs completed so far

    def _capture_due(self, trainer: pl.Trainer) -> bool:
        """Whether this validation epoch ends in a scheduled run that can take its forward results from it (one
        process: under DDP each rank's validation sees other images than its share)."""
        from pytorch_lightning.trainer.states import TrainerFn

        n = self.every_n_epochs
        return bool(
            self.reuse_validation
            and not self._skip(trainer)
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.world_size == 1
            and n
            and (trainer.current_epoch + 1) % n == 0
            and int(trainer.global_step) != self._ran_at
        )

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_capture()
        self._captured = []
        layers = self._captures() if self._capture_due(trainer) else None
        if layers is None:
            return
        paths = getattr(self._dataset, "image_paths", None)
        self._capture_epoch = int(trainer.current_epoch) + 1  # epochs completed at the run that follows
        self._capture = ValidationCapture(self._adapter, set(self._indices), self._take, layers, paths=paths)
        self._capture.start()

    def _take(self, batch: CapturedBatch) -> None:
        """The capture's consumer: a failure stops the capture (the run embeds those images itself) and warns."""
        try:
            self._captured.append(self._consume(batch))
        except Exception as err:
            self._stop_capture()
            self._captured = []
            if self.on_error == "raise":
                raise
            rank_zero_warn(
                f"{type(self).__name__}: reading the validation pass failed ({type(err).__name__}: {err}); "
                "this run computes its own forward instead."
            )

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.stop()
            self._capture = None

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture is not None:
            self._capture.batch_start(batch if dataloader_idx == 0 else None)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._capture is not None:
            self._capture.batch_end()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_capture()  # before the run: its own forwards are not the validation pass
        try:
            self._validation_end(trainer, pl_module)
        finally:
            self._captured = []

    def _validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.trainer.states import TrainerFn

        if self._skip(trainer):
            return
        if trainer.state.fn == TrainerFn.FITTING:
            if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                self._scheduled(trainer, pl_module, epoch=trainer.current_epoch + 1)
        elif trainer.state.fn == TrainerFn.VALIDATING:
            self._outside_fit(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip(trainer):
            self._outside_fit(trainer, pl_module, "test")

    def _outside_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.outside_fit:
            self._scheduled(trainer, pl_module, epoch=trainer.current_epoch, stage=stage, force=True)
        elif not self._said_outside:
            self._said_outside = True
            rank_zero_info(f"{type(self).__name__}: `outside_fit=False`, so `trainer.{stage}` explains nothing.")

    # ---------------------------------------------------------------------------------------------- run
    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int) -> RunContext:
        return RunContext(
            step=int(trainer.global_step),
            epoch=int(epoch),
            stage=stage,
            device=pl_module.device,
            rank=int(trainer.global_rank),
            world_size=int(trainer.world_size),
        )

    def _scheduled(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, stage: str = "fit", force: bool = False
    ) -> None:
        """Run once per step on every rank: each explains its share, every rank gets every record."""
        step = int(trainer.global_step)
        if step == self._ran_at and not force:  # several hooks at one step (validation + step schedule): once
            return
        if self._budget is not None and not force and not self._budget.decide(trainer, type(self).__name__):
            return  # over the TimeBudget: skipped alike on every rank (rank zero decides)
        self._ran_at = self._last_step = step
        with self._counted():
            self._scheduled_run(trainer, pl_module, epoch, stage, step)

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """The wall time of the block, counted in the trainer's TimeBudget (if any), also when it raises."""
        start = _budget.clock()
        try:
            yield
        finally:
            if self._budget is not None:
                self._budget.spend(type(self).__name__, _budget.clock() - start)

    def _scheduled_run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, stage: str, step: int
    ) -> None:
        ctx = self._context(trainer, pl_module, stage, epoch)
        share = list(range(ctx.rank, len(self._indices), ctx.world_size))
        try:
            with self._explaining():
                record = self._run(share, ctx)
        except Exception as err:
            if self.on_error == "raise" and ctx.world_size == 1:
                raise
            record = _Failed(ctx.rank, f"{type(err).__name__}: {err}")
        records = _all_gather(record, ctx.world_size)
        failed = [r for r in records if isinstance(r, _Failed)]
        if failed:
            reasons = [f"rank {f.rank}: {f.message}" if ctx.world_size > 1 else f.message for f in failed]
            if self.on_error == "raise":
                raise RuntimeError(f"{type(self).__name__} failed at step {step}: {'; '.join(reasons)}")
            rank_zero_warn(f"{type(self).__name__} failed at step {step} ({'; '.join(reasons)}); training continues.")
            self._on_failure(trainer, reasons, ctx)
            return
        merged = self._merge(records)
        self._on_record(trainer, merged, ctx)
        if self._writer is not None:
            self._submit(lambda: self._write(merged, ctx), f"writing step {step}")

    def _explaining(self) -> contextlib.AbstractContextManager:
        """One explaining context of the model for a whole run: every engine's own entry inside nests cheaply
        (~1 ms instead of ~10 ms on YOLOv8n); an adapter without a module (a test double) gets none."""
        model = getattr(self._adapter, "model", None)
        return explaining(model, seed=self.seed) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()

    def run_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the callback's work now, outside its schedule (every rank must call it), and wait until it is written.

        Raises:
            ConfigurationError: before ``setup()``.
        """
        self._require_setup()
        self._scheduled(trainer, pl_module, epoch=trainer.current_epoch, force=True)
        self.flush()

    # ------------------------------------------------------------------------------------ background writing
    def _submit(self, fn: Callable[[], Any], what: str) -> None:
        """Rank zero draws and writes on one worker thread, so the next training step does not wait for
        matplotlib and PNG encoding (``background=False``: on the calling thread)."""
        self._raise_pending()
        if not self.background:
            self._safely(fn, what)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"xaiwatch-{type(self).__name__}", initializer=_serial_torch
            )

        def job() -> None:
            with self._counted():
                try:
                    self._safely(fn, what)
                except Exception as err:  # on_error="raise": re-raised on the training thread
                    self._pending = err

        self._futures.append(self._pool.submit(job))

    def flush(self) -> None:
        """Wait until every picture submitted so far is drawn and written (and re-raise an error of the writer
        under ``on_error="raise"``)."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._pending is not None:
            err, self._pending = self._pending, None
            raise err

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush()
        if self._writer is not None and not self._disabled:
            with self._counted():
                self._safely(self._at_fit_end, "the end of fit")

    def _at_fit_end(self) -> None:  # noqa: B027
        """Rank zero, once everything is written: end-of-fit outputs (filmstrips)."""

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING:  # trainer.validate returns with everything written
            self.flush()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.flush()  # what a checkpoint's state says was explained is on disk before the checkpoint is

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_capture()  # no hook of ours stays on the model
        self._captured = []
        futures, self._futures = self._futures, []
        for future in futures:  # what was explained before the failure is still written
            future.exception()
        self._pending = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_capture()
        self.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _safely(self, fn: Callable[[], Any], what: str) -> None:
        """Run ``fn`` (rank-local work with no collective) with the ``on_error`` policy."""
        try:
            fn()
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"{type(self).__name__} failed at {what} ({type(err).__name__}: {err}); training continues.")

    # -------------------------------------------------------------------------------------------- state
    def _base_state(self) -> dict[str, Any]:
        return {
            "probe_indices": list(self._indices or []),
            "probe_keys": list(self._keys),
            "log_dirs": list(self._log_dirs),
            "last_step": self._last_step,
        }

    def _load_base_state(self, state: dict[str, Any], index_key: str = "probe_indices") -> None:
        indices = state.get("probe_indices", state.get(index_key, []))
        self._indices = [int(i) for i in indices] or None
        self._keys = list(state.get("probe_keys", []))
        self._log_dirs = list(state.get("log_dirs", []))
        self._restored_log_dirs = list(self._log_dirs)
        self._last_step = int(state.get("last_step", -1))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # the worker thread does not travel (ddp_spawn pickles callbacks)
        state.update(_pool=None, _futures=[], _pending=None, _capture=None, _captured=[])
        return state

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._base_state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)


def _all_gather(record: Any, world_size: int) -> list[Any]:
    """Every rank's record on every rank (``torch.distributed.all_gather_object``), issued by every rank."""
    if world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [record]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, record)
    return out


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor (inside dataclasses, lists, tuples and dicts) moved to the CPU and detached."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        )
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value
