"""``xaiwatch report``: one self-contained HTML page (pictures inlined) that tells a run's story."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.logging.tensorboard import Tags
from xaiwatch.report.events import RunData, find_runs, load_run, parse_thresholds, passes

__all__ = ["MARKER", "build_report", "write_report"]

#: written into every report: a file holding it may be replaced by a new report, any other file never is
MARKER = "<!-- xaiwatch-report: written by `xaiwatch report`; a new report may replace this file -->"
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;color:#1c1c1e}
h1{font-size:26px}h2{font-size:21px;border-bottom:2px solid #e5e5ea;padding-bottom:4px;margin-top:36px}
h3{font-size:17px;margin-top:22px}table{border-collapse:collapse;margin:8px 0;font-size:14px}
td,th{border:1px solid #d1d1d6;padding:4px 8px;text-align:right}th{background:#f2f2f7}td.l,th.l{text-align:left}
td.pass{background:#d8f5dd}td.fail{background:#ffd9d6}img{max-width:100%;height:auto;display:block;margin:6px 0}
.verdict{font-size:18px;padding:10px 14px;border-radius:8px;display:inline-block;margin:6px 0}
.ok{background:#d8f5dd}.bad{background:#ffd9d6}.unsure{background:#ffefc2}.note{color:#636366;font-size:14px}pre{white-space:pre-wrap}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _img(data: bytes, alt: str, mime: str = "image/png", **attrs: object) -> str:
    extra = "".join(f' data-{k}="{_e(v)}"' for k, v in attrs.items())
    return f'<img alt="{_e(alt)}"{extra} src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _smaller(png: bytes, quality: int = 88) -> tuple[bytes, str]:
    """The picture as JPEG when that halves its size (photographs with heat maps), else the PNG as it is."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=quality)
    jpeg = buffer.getvalue()
    return (jpeg, "image/jpeg") if len(jpeg) < len(png) / 2 else (png, "image/png")


def _picture(run: RunData, tag: str, event: tuple) -> str:
    step = event[0]
    data, mime = _smaller(event[1])
    return _img(data, f"{tag} at step {step}", mime, tag=tag, step=step)


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    classes: Sequence[Sequence[str]] | None = None,
    left: int = 1,
) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            cls = "l" if i < left else (classes[r][i] if classes else "")
            cells.append(f'<td class="{cls}">{_e(cell)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}"


# ------------------------------------------------------------------------------------------------- sections
def _by_epoch(run: RunData, tag: str) -> list[tuple[int, float]]:
    """Scalars Lightning logs per global step, as (epochs trained, value)."""
    epochs = run.epoch_of_step()
    events = run.scalar(tag)
    return [(epochs.get(step, i + 1), value) for i, (step, value) in enumerate(events)]


def _verdicts(run: RunData) -> dict[int, bool]:
    return {run.epoch(step): value >= 0.5 for step, value in run.scalar(Tags.GATE_PASS)}


def _inconclusive(run: RunData) -> set[int]:
    """Epochs whose verdict was inconclusive (too few probes with a detected object): neither passed nor failed."""
    return {run.epoch(step) for step, value in run.scalar(Tags.check("gate_inconclusive")) if value >= 0.5}


def _summary(run: RunData) -> str:
    parts = []
    verdicts = _verdicts(run)
    map50 = _by_epoch(run, "val/map50")
    if map50:
        best = max(map50, key=lambda p: p[1])
        parts.append(
            f"<p>val/map50 after the last epoch ({map50[-1][0]}): <b>{map50[-1][1]:.3f}</b>; best "
            f"{best[1]:.3f} at epoch {best[0]}.</p>"
        )
    if verdicts:
        unsure = _inconclusive(run)
        passed = [e for e, ok in verdicts.items() if ok]
        failed = [e for e, ok in verdicts.items() if not ok and e not in unsure]
        last_epoch, last_ok = max(verdicts.items())
        cls = "ok" if last_ok else "unsure" if last_epoch in unsure else "bad"
        word = "passed" if last_ok else "was inconclusive" if last_epoch in unsure else "failed"
        unsure_text = f"; inconclusive at {sorted(unsure)}" if unsure else ""
        parts.append(
            f'<div class="verdict {cls}">Saliency gate: the last model (epoch {last_epoch}) {word}. '
            f"Passed at epochs {passed or 'none'}; failed at {failed or 'none'}{unsure_text}.</div>"
        )
        parts.append(
            '<p class="note">A gate in "block" mode lets checkpoints be saved only at passing epochs (and, with the '
            'default <code>inconclusive="warn"</code>, at inconclusive ones, with a warning).</p>'
        )
    else:
        parts.append('<p class="note">No saliency gate in this run (no saliency/gate_pass).</p>')
    return "".join(parts)


def verdict_groups(run: RunData) -> dict[str, list[int]]:
    """The gate's decided epochs by verdict: ``{"passed": [...], "inconclusive": [...], "failed": [...]}``."""
    unsure = _inconclusive(run)
    groups: dict[str, list[int]] = {"passed": [], "inconclusive": [], "failed": []}
    for epoch, ok in sorted(_verdicts(run).items()):
        groups["passed" if ok else "inconclusive" if epoch in unsure else "failed"].append(epoch)
    return groups


def _settings(run: RunData) -> str:
    if not run.hparams:
        return '<p class="note">No hparams.yaml in the run directory.</p>'
    rows = [[str(k), str(v)[:200]] for k, v in sorted(run.hparams.items(), key=lambda kv: str(kv[0]))]
    return _table(["setting", "value"], rows, left=2)


def _curves(run: RunData) -> str:
    map50, mapall = _by_epoch(run, "val/map50"), _by_epoch(run, "val/map")
    train, val = run.scalar("train/loss"), run.scalar("val/loss")
    if not (map50 or train or val):
        return '<p class="note">No val/map50 or loss logged.</p>'
    fig = Figure(figsize=(13, 4.6), dpi=100)
    ax, bx = fig.add_axes((0.06, 0.14, 0.40, 0.74)), fig.add_axes((0.56, 0.14, 0.40, 0.74))
    if map50:
        ax.plot(*zip(*map50), "o-", color="#007aff", label="val/map50")
    if mapall:
        ax.plot(*zip(*mapall), "s--", color="#5ac8fa", label="val/map")
    values, groups = dict(map50), verdict_groups(run)
    styles = (("passed", "#34c759", "o"), ("inconclusive", "#ff9500", "D"), ("failed", "#ff3b30", "X"))
    for kind, color, marker in styles:
        epochs, name = groups[kind], f"gate {kind}"
        if epochs:
            ys = [values.get(e, 0.0) for e in epochs]
            ax.scatter(
                epochs,
                ys,
                s=140,
                facecolors=color if kind == "failed" else "none",
                edgecolors=color,
                marker=marker,
                linewidths=2,
                zorder=3,
                label=name,
            )
    ax.set_xlabel("epochs trained", fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("detection quality and the gate's verdict", fontsize=12)
    ax.legend(fontsize=10)
    ax.tick_params(labelsize=10)
    if train:
        bx.plot(*zip(*train), color="#8e8e93", label="train/loss")
    if val:
        bx.plot(*zip(*val), "o-", color="#ff9500", label="val/loss")
    bx.set_xlabel("optimiser steps", fontsize=11)
    bx.set_title("losses", fontsize=12)
    bx.legend(fontsize=10)
    bx.tick_params(labelsize=10)
    return _img(_png(fig), "val/map50, val/map and losses", plot="curves")


def _gate(run: RunData) -> str:
    verdicts = _verdicts(run)
    if not verdicts:
        return '<p class="note">No saliency gate in this run.</p>'
    skip = {Tags.GATE_PASS, Tags.GATE_SECONDS}
    reasons = run.texts.get(Tags.GATE_REASON, [])
    thresholds = parse_thresholds(reasons)
    keys = [t for t in run.tags("saliency/") if t not in skip]
    keys += [f"saliency/{k}" for k in sorted(thresholds) if f"saliency/{k}" not in keys]  # never measured: n/a
    header = ["epoch", "verdict"] + [
        f"{k[len('saliency/') :]} ({thresholds.get(k[len('saliency/') :], 'logged')})" for k in keys
    ]
    values = {k: {run.epoch(s): v for s, v in run.scalar(k)} for k in keys}
    rows, classes = [], []
    for epoch, ok in sorted(verdicts.items()):
        word = "passed" if ok else "inconclusive" if epoch in _inconclusive(run) else "FAILED"
        row, cls = [str(epoch), word], ["", "pass" if ok else "fail"]
        for k in keys:
            value = values[k].get(epoch)
            row.append(_fmt(value))
            condition = thresholds.get(k[len("saliency/") :])
            cls.append("" if condition is None or value is None else ("pass" if passes(value, condition) else "fail"))
        rows.append(row)
        classes.append(cls)
    text = "".join(f"<h4>epoch {run.epoch(s)} (step {s})</h4><pre>{_e(t)}</pre>" for s, t in reasons)
    details = f"<details><summary>the gate's reason text, every epoch</summary>{text}</details>" if reasons else ""
    return _table(header, rows, classes) + details


def _subjects(run: RunData) -> list[str]:
    names = {t[len("explain_tracked/score_") :] for t in run.tags("explain_tracked/score_")}
    names |= {t[len("explain_filmstrip/") :] for t in run.image_tags("explain_filmstrip/")}
    names |= {t.split("/")[-1] for t in run.image_tags("explain/")}
    return sorted(names)


def _score_plot(run: RunData, subject: str) -> str:
    scores = [(run.epoch(s), v) for s, v in run.scalar(Tags.tracked_score(subject))]
    detected = {run.epoch(s): v for s, v in run.scalar(Tags.detected(subject))}
    if not scores:
        return ""
    fig = Figure(figsize=(7.5, 3.2), dpi=100)
    ax = fig.add_axes((0.1, 0.18, 0.86, 0.7))
    ax.plot(*zip(*scores), "-", color="#007aff")
    for step, score in scores:
        hit = detected.get(step, 0.0) >= 0.5
        ax.scatter([step], [score], marker="o" if hit else "X", s=60, color="#34c759" if hit else "#ff3b30", zorder=3)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs trained (o detected, X missed)", fontsize=11)
    ax.set_title(f"{subject}: class score of the tracked object", fontsize=12)
    ax.tick_params(labelsize=10)
    return _img(_png(fig), f"score of {subject}", plot=f"score_{subject}")


def _tracked(run: RunData, all_pictures: bool) -> str:
    out = []
    for subject in _subjects(run):
        out.append(f"<h3>{_e(subject)}</h3>")
        out.append(_score_plot(run, subject))
        strip = run.images.get(Tags.filmstrip(subject))
        if strip:
            out.append(_picture(run, Tags.filmstrip(subject), strip[-1]))
        for tag in [t for t in run.image_tags("explain/") if t.split("/")[-1] == subject]:
            events = run.images[tag]
            chosen = events if all_pictures or len(events) <= 2 else [events[0], events[-1]]
            note = "every epoch" if len(chosen) == len(events) else "first and last epoch"
            pics = "".join(_picture(run, tag, e) for e in chosen)
            out.append(f"<details><summary>{_e(tag)} ({note})</summary>{pics}</details>")
    return "".join(out) or '<p class="note">No tracked objects (no ExplainCallback).</p>'


def _per_step_pictures(run: RunData, tags: list[str]) -> str:
    steps = sorted({e[0] for t in tags for e in run.images[t]})
    out = []
    for step in steps:
        pics = [_picture(run, t, e) for t in tags for e in run.images[t] if e[0] == step]
        out.append(
            f"<details {'open' if step == steps[-1] else ''}><summary>epoch {run.epoch(step)} (step {step})</summary>"
            f"{''.join(pics)}</details>"
        )
    return "".join(out)


def _scalar_table(run: RunData, tags: list[str], strip: str) -> str:
    if not tags:
        return ""
    series = {t: dict(run.scalar(t)) for t in tags}
    steps = sorted({s for values in series.values() for s in values})
    rows = [[str(run.epoch(s)), str(s)] + [_fmt(series[t].get(s)) for t in tags] for s in steps]
    return _table(["epoch", "step"] + [t[len(strip) :] for t in tags], rows)


def _errors(run: RunData) -> str:
    totals = [t for t in run.tags("errors/") if t.endswith("/all")]
    tags = run.image_tags("errors/")
    if not (totals or tags):
        return '<p class="note">No error analysis (no ErrorAnalysisCallback).</p>'
    return _scalar_table(run, totals, "errors/") + _per_step_pictures(run, tags)


def _boundary(run: RunData) -> str:
    tags = run.image_tags("boundary/picture/")
    if not tags:
        return ""
    return (
        "<h2>Decision boundaries</h2>"
        + _scalar_table(run, run.tags("boundary/min_eps/"), "boundary/min_eps/")
        + (_per_step_pictures(run, tags))
    )


def _projections(run: RunData) -> str:
    tags = [t for t in run.image_tags("projection/")]
    metrics = [t for t in run.tags("projection/")]
    if not (tags or metrics):
        return '<p class="note">No projections (no ProjectionCallback).</p>'
    return _scalar_table(run, metrics, "projection/") + _per_step_pictures(run, tags)


def _cost(run: RunData) -> str:
    tags = [t for t in run.scalars if any(re.match(p, t) for p in Tags.SECONDS_PATTERNS)]
    if not tags:
        return '<p class="note">No callback timings logged.</p>'
    rows = []
    for tag in sorted(tags):
        values = [v for _, v in run.scalar(tag)]
        rows.append([tag, str(len(values)), f"{sum(values) / len(values):.3f}", f"{sum(values):.2f}"])
    return _table(["callback timing", "runs", "mean seconds", "total seconds"], rows)


def _others(run: RunData, all_pictures: bool) -> str:
    known = ("explain/", "explain_filmstrip/", "errors/", "boundary/picture/", "projection/")
    tags = [t for t in sorted(run.images) if not t.startswith(known)]
    return ("<h2>Other pictures</h2>" + _per_step_pictures(run, tags)) if tags else ""


def _run_section(run: RunData, all_pictures: bool) -> str:
    return "".join(
        [
            f"<h1>Run {_e(run.path)}</h1>",
            _summary(run),
            f"<details><summary>the run's settings</summary>{_settings(run)}</details>",
            "<h2>Detection quality, losses and the gate's verdict per epoch</h2>",
            _curves(run),
            "<h2>The saliency gate's checks</h2>",
            _gate(run),
            "<h2>Tracked objects</h2>",
            _tracked(run, all_pictures),
            "<h2>Error analysis per epoch</h2>",
            _errors(run),
            _boundary(run),
            "<h2>Feature-space projections per epoch</h2>",
            _projections(run),
            "<h2>Cost of each callback</h2>",
            _cost(run),
            _others(run, all_pictures),
        ]
    )


def build_report(logdir: str | Path, all_pictures: bool = False) -> str:
    """The report of every run under ``logdir`` as one HTML string (pictures inlined as base64 PNG).

    Args:
        logdir: a run directory or a folder of runs (e.g. ``lightning_logs``).
        all_pictures: include every epoch's explanation pictures; by default the filmstrip stands for them and
            only the first and last epoch's pictures are included (all other pictures: every epoch).

    Returns:
        The HTML text.

    Raises:
        ConfigurationError: when ``logdir`` holds no event file.
    """
    runs = [load_run(r) for r in find_runs(logdir)]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join(_run_section(run, all_pictures) for run in runs)
    return (
        f'<!DOCTYPE html>\n{MARKER}\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="generator" content="xaiwatch report"><title>xaiwatch report: {_e(Path(logdir).name)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f'<p class="note">xaiwatch report of {_e(Path(logdir).resolve())}, written {when}.</p>{body}</body></html>\n'
    )


def write_report(logdir: str | Path, out: str | Path, all_pictures: bool = False) -> Path:
    """Write :func:`build_report` to ``out``, never replacing a file that is not an xaiwatch report.

    Args:
        logdir: a run directory or a folder of runs.
        out: the HTML file to write.
        all_pictures: see :func:`build_report`.

    Returns:
        The path written.

    Raises:
        ConfigurationError: when ``out`` exists and is not a report written by xaiwatch (it is left untouched),
            or is a directory, or ``logdir`` holds no event file.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigurationError(f"`out` {str(out)!r} is a directory; give a file name such as report.html.")
    if out.exists():
        with open(out, "rb") as handle:
            head = handle.read(4096).decode("utf-8", "replace")
        if MARKER not in head:
            raise ConfigurationError(
                f"{str(out)!r} exists and is not an xaiwatch report; it is left as it is. Choose another `-o` file."
            )
    text = build_report(logdir, all_pictures)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.xaiwatch-tmp")
    if tmp.exists():
        raise ConfigurationError(f"{str(tmp)!r} is in the way (a file of that name exists); move it away.")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
