"""Calibrate the saliency gate across generated dataset families (leave-one-family-out).

For each family of :data:`xaiwatch.data.shapes.FAMILIES` (class count, shapes, object sizes, photos and shortcut
kind differ) and each seed, two YOLOv8n models are trained from their yaml (no downloads): on the *shortcut* twin
(the cue follows the class in training) and on the *clean* twin (the same cue drawn at random). Both are judged
on the same validation images with the cue consistent with the class (where a shortcut hides: mAP looks fine).
The positive control is the counterfactual flip rate (cue made wrong, everything else pixel-identical).

    python examples/calibrate_gate.py train --family tint2 --twin shortcut --seed 0   # one model (one core)
    python examples/calibrate_gate.py evaluate                                         # every check, every model
    python examples/calibrate_gate.py real --run real_fall=/path/to/demo_real_output  # real clean fine-tunes
    python examples/calibrate_gate.py report --proof-family tint2                      # thresholds + tables
    python examples/calibrate_gate.py judge --defaults docs/calibration/calibration.json  # fixed thresholds, out of sample
    python examples/calibrate_gate.py all                                              # everything, in sequence

``real`` records every check of real clean fine-tunes written by ``xaiwatch demo --real`` (their Lightning
checkpoint and validation tiles; ``NAME=FOLDER[:CHECKPOINT]``, default ``last.ckpt``) into ``<out>/real.json``;
``report`` judges them with the defaults it chooses. ``report`` chooses each gated check's threshold on the families other than the held-out one and reports, per
held-out family, the clean false-refusal rate and the shortcut catch rate at the final epoch; it writes
``<out>/calibration.json`` and ``<out>/calibration.md``. The defaults are chosen on every family except
``--proof-family`` (the one ``make test-proof`` runs), so the proof is a claim about data not tuned on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

OUT = Path("runs/calibrate_gate")


# --------------------------------------------------------------------------------------------------- data
def make_data(root: Path, family: str, seed: int, num_train: int, num_val: int, imgsz: int) -> dict[str, Path]:
    """Both twins of one family and seed, and the cue-consistent / cue-wrong copies of the shared validation set.

    Written once: an existing folder is reused (its ``meta/info.json`` must match the arguments).
    """
    from xaiwatch.data.shapes import generate_family, write_counterfactual

    base = Path(root).resolve() / f"{family}_s{seed}"
    paths = {}
    for twin in ("shortcut", "clean"):
        folder = base / twin
        info = folder / "meta" / "info.json"
        wanted = {"num_train": num_train, "num_val": num_val, "imgsz": imgsz, "seed": seed}
        if not info.is_file() or any(json.loads(info.read_text()).get(k) != v for k, v in wanted.items()):
            generate_family(
                folder,
                family,
                shortcut=twin == "shortcut",
                seed=seed,
                num_train=num_train,
                num_val=num_val,
                imgsz=imgsz,
                overwrite=True,
            )
        paths[twin] = folder
    for mode in ("consistent", "wrong"):
        folder = base / "shortcut" / f"counterfactual_{mode}"
        if not (folder / "dataset.yaml").is_file():
            write_counterfactual(base / "shortcut", mode)
        paths[mode] = folder
    return paths


def _train_yaml(paths: dict[str, Path], twin: str, names: list[str]) -> Path:
    yaml = paths[twin].parent / f"{twin}.yaml"
    lines = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
    yaml.write_text(
        f"train: {paths[twin] / 'images' / 'train'}\nval: {paths['consistent'] / 'images' / 'val'}\nnames:\n{lines}\n"
    )
    return yaml


# --------------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> Path:
    """Train one model; save its weights at the end (and at ``--save-every`` epochs) into a fresh run folder."""
    import pytorch_lightning as pl

    from xaiwatch.data import YoloDataModule
    from xaiwatch.data.shapes import FAMILIES
    from xaiwatch.models import YOLOv8Module

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fam = FAMILIES[args.family]
    paths = make_data(out / "data", args.family, args.seed, args.num_train, args.num_val, args.imgsz)
    run = out / "runs" / f"{args.family}_{args.twin}_s{args.seed}"
    run.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, verbose=False)
    dm = YoloDataModule(
        str(_train_yaml(paths, args.twin, list(fam.classes))), imgsz=args.imgsz, batch_size=16, seed=args.seed
    )
    module = YOLOv8Module("yolov8n.yaml", num_classes=len(fam.classes), names=list(fam.classes), lr=1e-2)
    per_epoch = math.ceil(args.num_train / 16)
    epochs = max(1, round(args.steps / per_epoch))
    saved = []

    class Save(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if epoch == epochs or (args.save_every and epoch % args.save_every == 0):
                path = run / f"weights_e{epoch:03d}.pt"
                torch.save(pl_module.net.state_dict(), path)
                saved.append({"epoch": epoch, "step": trainer.global_step, "path": path.name})

    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Save()],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    meta = {
        "family": args.family,
        "twin": args.twin,
        "seed": args.seed,
        "imgsz": args.imgsz,
        "num_train": args.num_train,
        "epochs": epochs,
        "steps": trainer.global_step,
        "seconds": time.perf_counter() - start,
        "threads": args.threads,
        "weights": saved,
    }
    (run / "train.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))
    return run


# --------------------------------------------------------------------------------------------------- evaluate
#: Every check recorded per model (saliency maps for the map checks; the costly ones are left out).
RECORDED = {
    "pointing_game",
    "energy_in_box",
    "energy_concentration",
    "rank_accuracy",
    "off_object_energy",
    "context_reliance",
    "relative_context_reliance",
    "context_swap",
    "context_swap_drop",
    "swap_class_drop",
}


def _dataset(folder: Path, names: list[str], imgsz: int):
    from xaiwatch.data.yolo import YoloDataset

    return YoloDataset(folder / "images" / "val", names=names, imgsz=imgsz)


def flip_of(adapter, consistent, wrong) -> dict:
    """The positive control: share of all validation objects whose class changes when only the cue is made wrong."""
    from xaiwatch.callbacks.probes import probe_item
    from xaiwatch.checks import object_classes
    from xaiwatch.core.context import eval_state

    changed = counted = 0
    for start in range(0, len(consistent), 16):
        idx = range(start, min(start + 16, len(consistent)))
        a = [probe_item(consistent[i]) for i in idx]
        b = torch.stack([probe_item(wrong[i])[0] for i in idx])
        boxes = [bx for _, bx, _ in a]
        with torch.no_grad(), eval_state(adapter.model):
            ca = object_classes(adapter.raw(torch.stack([im for im, _, _ in a])), boxes)
            cb = object_classes(adapter.raw(b), boxes)
        for x, y in zip(ca, cb):
            both = (x >= 0) & (y >= 0)
            changed += int((x[both] != y[both]).sum())
            counted += int(both.sum())
    return {"flip": changed / counted if counted else math.nan, "objects": counted}


def load_run(run: Path, weights: str):
    """A trained run's ``train.json``, the adapter of its ``weights`` (eval mode) and its cue-consistent
    validation set (where the gate's probes come from)."""
    from xaiwatch.data.shapes import FAMILIES
    from xaiwatch.models import YOLOv8Module

    meta = json.loads((run / "train.json").read_text())
    names = list(FAMILIES[meta["family"]].classes)
    module = YOLOv8Module("yolov8n.yaml", num_classes=len(names), names=names)
    module.net.load_state_dict(torch.load(run / weights, weights_only=True))
    module.eval()
    base = run.parents[1] / "data" / f"{meta['family']}_s{meta['seed']}" / "shortcut"
    return meta, module.xai_adapter(), _dataset(base / "counterfactual_consistent", names, meta["imgsz"])


def gate_probes(dataset, num_probe: int, seed: int = 0):
    """``num_probe`` probes chosen as the gate chooses them, their tracked objects (the largest box of each) and
    those objects' boxes :math:`(N, 4)` and labels :math:`(N,)`."""
    from xaiwatch.callbacks.probes import choose_probe_indices, largest_objects, load_probes

    probes = load_probes(dataset, choose_probe_indices(dataset, num_probe, seed, "calibrate"), "calibrate")
    tracked = [largest_objects(b, lab, 1)[0] for b, lab in zip(probes.boxes, probes.labels)]
    boxes = torch.tensor([t[:4] for t in tracked])
    labels = torch.tensor([int(t[4]) for t in tracked])
    return probes, tracked, boxes, labels


def recorded_checks(
    adapter, dataset, num_probe: int, seed: int
) -> tuple[dict, object, list, torch.Tensor, torch.Tensor]:
    """Every :data:`RECORDED` check per probe on ``num_probe`` probes of ``dataset`` chosen as the gate chooses them:
    ``(values, probes, tracked, boxes, labels)`` (the last four from :func:`gate_probes`)."""
    from xaiwatch.checks import CheckOptions, evaluate_probes
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import MatchedBoxTarget

    probes, tracked, boxes, labels = gate_probes(dataset, num_probe, seed)
    targets = [MatchedBoxTarget(t[:4], int(t[4]), conf=adapter.conf) for t in tracked]
    values, _ = evaluate_probes(
        adapter,
        {"saliency": get_engine("saliency", adapter)},
        probes.images,
        targets,
        boxes,
        probes.boxes,
        RECORDED,
        CheckOptions(seed=seed),
        labels=labels,
        gt_labels=probes.labels,
    )
    return values, probes, tracked, boxes, labels


def _per_probe(values: dict) -> dict:
    """Check values as JSON lists, NaN as ``None``."""
    return {k: [None if math.isnan(float(x)) else float(x) for x in v.tolist()] for k, v in values.items()}


def evaluate_model(run: Path, weights: str, num_probe: int, seed: int = 0) -> dict:
    """Every recorded check (per probe) on ``num_probe`` probes chosen as the gate chooses them, and the flip rate."""
    from xaiwatch.checks import context_swap
    from xaiwatch.data.shapes import FAMILIES

    meta, adapter, consistent = load_run(run, weights)
    base = run.parents[1] / "data" / f"{meta['family']}_s{meta['seed']}" / "shortcut"
    wrong = _dataset(base / "counterfactual_wrong", list(FAMILIES[meta["family"]].classes), meta["imgsz"])
    start = time.perf_counter()
    control = flip_of(adapter, consistent, wrong)
    values, probes, _, boxes, labels = recorded_checks(adapter, consistent, num_probe, seed)
    by_fill = {}
    for margin in (0.0, 0.25):
        swap = context_swap(
            adapter, probes.images, boxes, labels, probes.boxes, probes.labels, min_score=adapter.conf, margin=margin
        )
        by_fill.update(
            {f"{f}@{margin:g}": {"flip": _nanmean(a), "drop": _nanmean(b)} for f, (a, b) in swap.by_fill.items()}
        )
        if margin:
            values["context_swap@0.25"] = swap.flip
            values["relative_context_reliance@0.25"] = torch.where(swap.defined, swap.by_fill["grey"][1], torch.nan)
    epoch = int(weights.split("_e")[1].split(".")[0])
    return {
        "family": meta["family"],
        "twin": meta["twin"],
        "seed": meta["seed"],
        "weights": weights,
        "epoch": epoch,
        "final": epoch == meta["epochs"],
        "train_seconds": meta["seconds"],
        "eval_seconds": time.perf_counter() - start,
        **control,
        "probes": num_probe,
        "checks": _per_probe(values),
        "by_fill": by_fill,
    }


def _nanmean(v: torch.Tensor) -> float | None:
    ok = v[~v.isnan()]
    return float(ok.mean()) if ok.numel() else None


def evaluate(args: argparse.Namespace) -> Path:
    """Evaluate every saved model under ``<out>/runs`` (``--all-epochs``: every saved epoch, else the final one)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / "records.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["family"], r["twin"], r["seed"], r["weights"]) for r in records}
    for run in sorted((out / "runs").glob("*/train.json")):
        meta = json.loads(run.read_text())
        weights = [w["path"] for w in meta["weights"]]
        for w in weights if args.all_epochs else weights[-1:]:
            if (meta["family"], meta["twin"], meta["seed"], w) in done:
                continue
            rec = evaluate_model(run.parent, w, args.num_probe)
            records.append(rec)
            path.write_text(json.dumps(records, indent=1))
            short = {
                k: _nanmean(torch.tensor([math.nan if x is None else x for x in v])) for k, v in rec["checks"].items()
            }
            print(
                f"{run.parent.name} {w} flip {rec['flip']:.2f} "
                + " ".join(f"{k}={v:.3f}" for k, v in short.items() if v is not None),
                flush=True,
            )
    return path


def load_real_run(run: Path, checkpoint: str = "last.ckpt", imgsz: int = 224):
    """A real fine-tune written by ``xaiwatch demo --real`` (``<run>/tensorboard/version_0/checkpoints/<checkpoint>``
    and ``<run>/data``): its Lightning checkpoint's module (eval mode), adapter and validation tiles.

    The architecture and class names come from the checkpoint's hyper-parameters; the pretrained file it was
    fine-tuned from is not read (the checkpoint holds every weight).
    """
    from xaiwatch.models import YOLOv8Module

    ckpt_path = Path(run) / "tensorboard" / "version_0" / "checkpoints" / checkpoint
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own Lightning checkpoint
    hp = ckpt["hyper_parameters"]
    module = YOLOv8Module(hp["model"], num_classes=hp["num_classes"], names=list(hp["names"]))
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    meta = {"epoch": int(ckpt["epoch"]) + 1, "step": int(ckpt["global_step"]), "model": hp["model"]}
    return meta, module.xai_adapter(), _dataset(Path(run) / "data", list(hp["names"]), imgsz)


def evaluate_real_model(name: str, run: Path, checkpoint: str, num_probe: int, imgsz: int, seed: int = 0) -> dict:
    """Every recorded check (per probe) of a real clean fine-tune, as :func:`evaluate_model` records a generated
    one (no counterfactual flip rate: real data has no known cue)."""
    meta, adapter, val = load_real_run(run, checkpoint, imgsz)
    start = time.perf_counter()
    values, _, tracked, _, _ = recorded_checks(adapter, val, num_probe, seed)
    for key in ("context_swap", "relative_context_reliance"):  # the margin-0.25 keys are the recorded defaults
        values[f"{key}@0.25"] = values[key]
    return {
        "family": name,
        "twin": "clean",
        "seed": seed,
        "weights": checkpoint,
        "epoch": meta["epoch"],
        "step": meta["step"],
        "model": meta["model"],
        "final": True,
        "eval_seconds": time.perf_counter() - start,
        "flip": None,
        "probes": len(tracked),
        "checks": _per_probe(values),
    }


def evaluate_real(args: argparse.Namespace) -> Path:
    """Record every check of the real runs given as ``--run NAME=FOLDER[:CHECKPOINT]`` into ``<out>/real.json``."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / "real.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    for spec in args.run:
        name, _, rest = spec.partition("=")
        folder, _, checkpoint = rest.partition(":")
        if not name or not folder:
            raise SystemExit(f"--run must be NAME=FOLDER[:CHECKPOINT], got {spec!r}")
        checkpoint = checkpoint or "last.ckpt"
        records = [r for r in records if (r["family"], r["weights"]) != (name, checkpoint)]
        rec = evaluate_real_model(name, Path(folder), checkpoint, args.num_probe, args.imgsz)
        records.append(rec)
        path.write_text(json.dumps(records, indent=1))
        short = {k: _summary(rec, k) for k in rec["checks"]}
        print(
            f"{name} {checkpoint} (epoch {rec['epoch']}) "
            + " ".join(f"{k}={v:.3f}({n})" for k, (v, n) in short.items() if n),
            flush=True,
        )
    return path


# --------------------------------------------------------------------------------------------------- report
#: Checks a gate may decide on, with the side that passes.
CANDIDATES = {
    "relative_context_reliance": "max",
    "context_reliance": "max",
    "context_swap": "max",
    "context_swap_drop": "max",
    "swap_class_drop": "max",
    "energy_concentration/saliency": "min",
    "rank_accuracy/saliency": "min",
    "energy_in_box/saliency": "min",
    "context_swap@0.25": "max",
    "relative_context_reliance@0.25": "max",
}
LEARNED = 0.5  # flip rate from which a shortcut model must be refused
MIN_DEFINED = 4  # the gate's default for 16 probes
LEVEL = 0.9  # the gate's confidence level (judge's default)
MIN_EFFECT = 0.05  # the smallest effect a max-check refuses for: 5% of the score, 5% of the variants flipped


def _summary(rec: dict, key: str) -> tuple[float, int]:
    vals = [v for v in rec["checks"].get(key, []) if v is not None]
    return (sum(vals) / len(vals) if vals else math.nan), len(vals)


def _bound(rec: dict, key: str, direction: str) -> float | None:
    """The statistic the gate decides with: the one-sided 90% bootstrap bound of a model's mean on its passing side
    (the lower bound for a check that must stay below its threshold). ``None`` with fewer than ``MIN_DEFINED``
    defined probes (the gate calls such a model inconclusive, never refuses it)."""
    from xaiwatch.checks.verdict import one_sided_bound

    vals = [v for v in rec["checks"].get(key, []) if v is not None]
    return one_sided_bound(vals, direction, LEVEL) if len(vals) >= MIN_DEFINED else None


def choose_threshold(records: list[dict], key: str, direction: str) -> float | None:
    """A threshold from the training families' final models, consistent with the gate's rule (``judge``: a model
    fails when its mean *and* its one-sided bound are beyond the threshold).

    The clean reach is the largest one-sided bound of a clean model (what no clean training model may exceed: 0
    false refusals there). With learned shortcuts (flip >= 0.5) whose bounds lie beyond it, the threshold is halfway
    between the clean reach and the mildest of them; otherwise the reach itself. Rounded to 0.01 away from the
    clean side, and for checks that must stay below their threshold never under ``MIN_EFFECT`` (a significant but
    immaterial effect, such as 1% of the score lost without context, is no reason to refuse a model). ``None``
    without a decidable clean model.
    """
    sign = 1.0 if direction == "max" else -1.0
    bounds = [_bound(r, key, direction) for r in records if r["twin"] == "clean"]
    bounds = [sign * b for b in bounds if b is not None]
    short = [_bound(r, key, direction) for r in records if r["twin"] == "shortcut" and r["flip"] >= LEARNED]
    short = [sign * b for b in short if b is not None]
    if not bounds:
        return None
    worst = max(bounds)
    mild = min(short) if short else -math.inf
    t = (worst + mild) / 2 if mild > worst else worst
    t = math.ceil(t * 100 - 1e-9) / 100
    return max(sign * t, MIN_EFFECT) if direction == "max" else sign * t


def choose_gate(records: list[dict], gated: list[str], confirm: dict[str, str] | None = None) -> dict[str, float]:
    """Thresholds of a gate from the training families' final models: :func:`choose_threshold` for each gated
    check, except a confirming check (``confirm``: check -> the check confirming it), whose threshold is chosen on
    the models its confirmed check alone would refuse (the clean ones it must spare, the learned shortcuts it must
    keep refused); ``MIN_EFFECT`` when the confirmed check refuses no clean model."""
    confirm = dict(confirm or {})
    out = {}
    for key in gated:
        if key not in confirm.values():
            t = choose_threshold(records, key, CANDIDATES[key])
            if t is not None:
                out[key] = t
    for main, key in confirm.items():
        if main not in out:
            continue
        refused = [r for r in records if _decide(r, {main: out[main]}) == "fail"]
        t = choose_threshold(refused, key, CANDIDATES[key]) if any(r["twin"] == "clean" for r in refused) else None
        out[key] = MIN_EFFECT if t is None else t
    return out


def _decide(rec: dict, thresholds: dict[str, float], confirm: dict[str, str] | None = None) -> str:
    """The gate's verdict on one model's recorded per-probe values (the gate's own rule, ``judge``)."""
    from xaiwatch.checks import Rule, judge

    rules = [Rule(k, k.split("/")[0].split("@")[0], float(v), CANDIDATES[k]) for k, v in thresholds.items()]
    values = {k: torch.tensor([math.nan if x is None else x for x in rec["checks"][k]]) for k in thresholds}
    pairs = {k: v for k, v in (confirm or {}).items() if k in thresholds and v in thresholds}
    return judge(values, rules, MIN_DEFINED, confirm=pairs).status


def _family_rows(records: list[dict], family: str, thresholds: dict[str, float], confirm=None) -> dict:
    mine = [r for r in records if r["family"] == family]
    clean = [r for r in mine if r["twin"] == "clean"]
    learned = [r for r in mine if r["twin"] == "shortcut" and r["flip"] >= LEARNED]
    between = [r for r in mine if r["twin"] == "shortcut" and 0.2 <= r["flip"] < LEARNED]
    verdict = {f"{r['twin']}_s{r['seed']}": _decide(r, thresholds, confirm) for r in mine}
    refused_clean = [r for r in clean if verdict[f"clean_s{r['seed']}"] == "fail"]
    caught = [r for r in learned if verdict[f"shortcut_s{r['seed']}"] == "fail"]
    return {
        "thresholds": thresholds,
        "models": {
            f"{r['twin']}_s{r['seed']}": {
                "flip": r["flip"],
                "verdict": verdict[f"{r['twin']}_s{r['seed']}"],
                **{k: _summary(r, k)[0] for k in thresholds},
            }
            for r in mine
        },
        "clean": len(clean),
        "clean_refused": len(refused_clean),
        "learned_shortcuts": len(learned),
        "caught": len(caught),
        "between_0.2_0.5": {f"shortcut_s{r['seed']}": verdict[f"shortcut_s{r['seed']}"] for r in between},
    }


#: The gates compared in the report: name -> (gated checks, confirm pairs).
GATES = {
    "grey alone (the previous default)": (["relative_context_reliance@0.25"], {}),
    "swap_class_drop alone": (["swap_class_drop"], {}),
    "both gated": (["relative_context_reliance@0.25", "swap_class_drop"], {}),
    "grey confirmed by swap_class_drop": (
        ["relative_context_reliance@0.25", "swap_class_drop"],
        {"relative_context_reliance@0.25": "swap_class_drop"},
    ),
}


def _gate_report(records, families, gated, confirm, proof_family, real) -> dict:
    """One gate, leave-one-family-out; its defaults (chosen without ``proof_family``) on the proof family and on
    the real clean models."""
    lofo = {}
    for fam in families:
        th = choose_gate([r for r in records if r["family"] != fam], gated, confirm)
        lofo[fam] = _family_rows(records, fam, th, confirm)
    tuning = [r for r in records if r["family"] != proof_family]
    defaults = choose_gate(tuning, gated, confirm)
    held = _family_rows(records, proof_family, defaults, confirm) if proof_family in families else None
    return {
        "gated": gated,
        "confirm": confirm,
        "lofo": lofo,
        "lofo_false_refusals": sum(r["clean_refused"] for r in lofo.values()),
        "lofo_clean": sum(r["clean"] for r in lofo.values()),
        "lofo_caught": sum(r["caught"] for r in lofo.values()),
        "lofo_learned": sum(r["learned_shortcuts"] for r in lofo.values()),
        "defaults": defaults,
        "defaults_on_proof_family": held,
        "real": {
            f"{r['family']} {r['weights']}": {
                "verdict": _decide(r, defaults, confirm),
                **{k: list(_summary(r, k)) for k in defaults},
            }
            for r in real
        },
    }


def judge_fixed(args: argparse.Namespace) -> Path:
    """Judge the final models under ``<out>`` with *fixed* thresholds (the ``defaults`` and ``confirm`` of an earlier
    ``calibration.json``): nothing is chosen on these models, so the table is an out-of-sample report. Writes
    ``<out>/judged.md``."""
    out = Path(args.out)
    shipped = json.loads(Path(args.defaults).read_text())
    thresholds, confirm = shipped["defaults"], shipped.get("confirm") or {}
    records = [r for r in json.loads((out / "records.json").read_text()) if r["final"]]
    lines = [
        f"Thresholds fixed in advance ({args.defaults}): "
        + ", ".join(f"`{k}` {v:g}" for k, v in thresholds.items())
        + "".join(f" (`{k}` confirmed by `{v}`)" for k, v in confirm.items()),
        "",
        "| family | clean refused | learned shortcuts (flip >= 0.5) caught | models: flip -> verdict |",
        "|---|---|---|---|",
    ]
    totals = [0, 0, 0, 0]
    for fam in sorted({r["family"] for r in records}):
        rows = _family_rows(records, fam, thresholds, confirm)
        totals = [a + b for a, b in zip(totals, (rows["clean_refused"], rows["clean"], rows["caught"],
                                                  rows["learned_shortcuts"]))]  # fmt: skip
        models = "; ".join(f"{k} {v['flip']:.2f} -> {v['verdict']}" for k, v in sorted(rows["models"].items()))
        lines.append(
            f"| {fam} | {rows['clean_refused']}/{rows['clean']} | {rows['caught']}/{rows['learned_shortcuts']} | "
            f"{models} |"
        )
    lines.append(f"| all | {totals[0]}/{totals[1]} | {totals[2]}/{totals[3]} | |")
    path = out / "judged.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def report(args: argparse.Namespace) -> Path:
    """Leave-one-family-out calibration: per check and for the chosen gate; the defaults without the proof family."""
    out = Path(args.out)
    records = [r for r in json.loads((out / "records.json").read_text()) if r["final"]]
    real_path = out / "real.json"
    real = json.loads(real_path.read_text()) if real_path.is_file() else []
    families = sorted({r["family"] for r in records})
    per_check = {}
    for key, direction in CANDIDATES.items():
        rows = {}
        for fam in families:
            t = choose_threshold([r for r in records if r["family"] != fam], key, direction)
            rows[fam] = None if t is None else _family_rows(records, fam, {key: t})
        fr = sum(r["clean_refused"] for r in rows.values() if r)
        caught = sum(r["caught"] for r in rows.values() if r)
        per_check[key] = {"lofo_false_refusals": fr, "lofo_caught": caught, "families": rows}
    gated = list(args.gated)
    confirm = dict(c.split("=", 1) for c in args.confirm)
    chosen = _gate_report(records, families, gated, confirm, args.proof_family, real)
    gates = {name: _gate_report(records, families, g, c, args.proof_family, real) for name, (g, c) in GATES.items()}
    tuning = [r for r in records if r["family"] != args.proof_family]
    result = {
        "records": len(records),
        "families": families,
        "learned_flip": LEARNED,
        "min_defined": MIN_DEFINED,
        "per_check": per_check,
        "gated": gated,
        "confirm": confirm,
        "lofo": chosen["lofo"],
        "proof_family": args.proof_family,
        "defaults_chosen_on": sorted({r["family"] for r in tuning}),
        "defaults": chosen["defaults"],
        "defaults_on_proof_family": chosen["defaults_on_proof_family"],
        "real": chosen["real"],
        "gates": gates,
    }
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    (out / "calibration.md").write_text(_markdown(result, records, real))
    print(_markdown(result, records, real))
    return out / "calibration.json"


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _markdown(res: dict, records: list[dict], real: list[dict] = ()) -> str:
    keys = list(CANDIDATES)
    lines = [
        "### Every check at the final epoch (mean over defined probes / defined of 16)",
        "",
        "| family | model | flip | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for r in sorted(records, key=lambda r: (r["family"], r["twin"], r["seed"])):
        cells = []
        for k in keys:
            v, n = _summary(r, k)
            cells.append(f"{_fmt(v)} ({n})")
        lines.append(f"| {r['family']} | {r['twin']} s{r['seed']} | {r['flip']:.2f} | " + " | ".join(cells) + " |")
    for r in real:
        cells = [f"{_fmt(_summary(r, k)[0])} ({_summary(r, k)[1]})" for k in keys]
        lines.append(
            f"| {r['family']} (real) | clean {r['weights']} epoch {r['epoch']} | n/a | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "### Each check alone, leave-one-family-out (threshold chosen on the other families)",
        "",
        "| check | clean false refusals | learned shortcuts caught (flip >= 0.5) |",
        "|---|---|---|",
    ]
    for k, v in res["per_check"].items():
        total_clean = sum(r["clean"] for r in v["families"].values() if r)
        total_learned = sum(r["learned_shortcuts"] for r in v["families"].values() if r)
        lines.append(f"| `{k}` | {v['lofo_false_refusals']} / {total_clean} | {v['lofo_caught']} / {total_learned} |")
    lines += [
        "",
        f"### The gate ({', '.join(f'`{k}`' for k in res['gated'])}), leave-one-family-out",
        "",
        "| held-out family | thresholds (chosen on the others) | clean false-refusal rate | shortcut catch rate "
        "(flip >= 0.5) | models: flip -> verdict |",
        "|---|---|---|---|---|",
    ]
    for fam, row in res["lofo"].items():
        th = ", ".join(f"{k} {v:g}" for k, v in row["thresholds"].items())
        models = "; ".join(f"{m} {d['flip']:.2f} -> {d['verdict']}" for m, d in row["models"].items())
        fr = f"{row['clean_refused']}/{row['clean']}"
        cr = f"{row['caught']}/{row['learned_shortcuts']}" if row["learned_shortcuts"] else "no learned shortcut"
        lines.append(f"| {fam} | {th} | {fr} | {cr} | {models} |")
    lines += [
        "",
        "### The gates compared (leave-one-family-out on the generated families; the real clean models judged with "
        "the gate's defaults, chosen on every family but the proof family)",
        "",
        "| gate | defaults | clean false refusals (LOFO) | learned shortcuts caught (LOFO) | per held-out family: "
        "clean refused, shortcuts caught | real clean models |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in res.get("gates", {}).items():
        th = ", ".join(f"`{k}` {v:g}" for k, v in g["defaults"].items())
        if g["confirm"]:
            th += " (" + ", ".join(f"`{k}` confirmed by `{v}`" for k, v in g["confirm"].items()) + ")"
        fams = "; ".join(
            f"{f} {row['clean_refused']}/{row['clean']}, {row['caught']}/{row['learned_shortcuts']}"
            for f, row in g["lofo"].items()
        )
        reals = "; ".join(f"{m} -> {d['verdict']}" for m, d in g["real"].items()) or "none recorded"
        lines.append(
            f"| {name} | {th} | {g['lofo_false_refusals']} / {g['lofo_clean']} | {g['lofo_caught']} / "
            f"{g['lofo_learned']} | {fams} | {reals} |"
        )
    d = res["defaults"]
    lines += [
        "",
        f"Defaults chosen on {', '.join(res['defaults_chosen_on'])}: "
        + ", ".join(f"`{k}` {v:g}" for k, v in d.items() if v is not None),
    ]
    if res["defaults_on_proof_family"]:
        row = res["defaults_on_proof_family"]
        lines.append(
            f"On the held-out proof family {res['proof_family']}: clean refused {row['clean_refused']}/"
            f"{row['clean']}, learned shortcuts caught {row['caught']}/{row['learned_shortcuts']}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model")
    t.add_argument("--family", required=True)
    t.add_argument("--twin", choices=["shortcut", "clean"], required=True)
    t.add_argument("--seed", type=int, default=0)
    for p in (t,):
        p.add_argument("--out", default=str(OUT))
        p.add_argument("--imgsz", type=int, default=128)
        p.add_argument("--num-train", type=int, default=300)
        p.add_argument("--num-val", type=int, default=64)
        p.add_argument("--steps", type=int, default=250)
        p.add_argument("--save-every", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("evaluate", help="record every check of every trained model")
    e.add_argument("--out", default=str(OUT))
    e.add_argument("--num-probe", type=int, default=16)
    e.add_argument("--all-epochs", action="store_true")
    e.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("real", help="record every check of real clean fine-tunes (xaiwatch demo --real runs)")
    q.add_argument("--out", default=str(OUT))
    q.add_argument("--run", nargs="+", required=True, help="NAME=FOLDER[:CHECKPOINT] (default last.ckpt)")
    q.add_argument("--num-probe", type=int, default=16)
    q.add_argument("--imgsz", type=int, default=224)
    q.add_argument("--threads", type=int, default=1)
    j = sub.add_parser("judge", help="judge the models with thresholds fixed in advance (out of sample)")
    j.add_argument("--out", default=str(OUT))
    j.add_argument("--defaults", default="docs/calibration/calibration.json")
    r = sub.add_parser("report", help="leave-one-family-out thresholds and tables")
    r.add_argument("--out", default=str(OUT))
    r.add_argument("--proof-family", default="tint2")
    r.add_argument(
        "--gated", nargs="+", default=["relative_context_reliance@0.25", "swap_class_drop"], choices=CANDIDATES
    )
    r.add_argument(
        "--confirm",
        nargs="*",
        default=["relative_context_reliance@0.25=swap_class_drop"],
        help="CHECK=CONFIRMING: CHECK refuses a model only when CONFIRMING fails too",
    )
    args = parser.parse_args()
    if args.command == "report":
        report(args)
    if args.command == "train":
        train(args)
    elif args.command == "evaluate":
        evaluate(args)
    elif args.command == "real":
        evaluate_real(args)
    elif args.command == "judge":
        judge_fixed(args)


if __name__ == "__main__":
    main()
