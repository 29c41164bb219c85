"""``segq report``: one self-contained HTML page per dataset (inline CSS, images as base64 PNG).

The page holds the summary, the results table, three plots (per-volume time, tumour volume
histogram, per-worker throughput), the timeline of every step with each GPU's busy fraction
(segq/timeline.py) and, for each done volume, the middle slice through its mask overlaid on the
input. A bundle's label map is drawn one colour per label (LABEL_COLOURS, by label value, so a label keeps its
colour on every volume) with a legend of the label names, and a table of each label's volumes. matplotlib draws
off-screen (Agg); nothing here imports torch.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, func, select

from producer.cases import shown_input
from producer.results import input_shown, job_elapsed, label_names, rows, summarize, summary_line
from segq import clock, records
from segq.db import ensure_schema, session_scope
from segq.errors import InputError
from segq.models import Dataset, Job, Status, Step, Subtask
from segq.storage import atomic_path, printable

logger = logging.getLogger("segq.report")

TABLE_COLUMNS = ["input", "status", "tumour_ml", "tumour_voxels", "windows", "subtasks", "seconds",
                 "inference_seconds", "workers", "dice", "error"]
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#1d1d1f;background:#fff}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.summary{color:#444;margin:.3rem 0 1rem} table{border-collapse:collapse;font-size:.85rem;width:100%}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
.done{color:#1a7f37} .failed{color:#cf222e} .cancelled{color:#8250df} .running,.queued{color:#9a6700}
.plots{display:flex;flex-wrap:wrap;gap:1rem} .plots figure,.gallery figure{margin:0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.8rem}
figcaption{font-size:.75rem;color:#555;word-break:break-all} img{max-width:100%;height:auto}
.note{color:#777;font-style:italic}
.legend{display:flex;flex-wrap:wrap;gap:.3rem 1rem;list-style:none;padding:0;margin:.5rem 0;font-size:.85rem}
.swatch{display:inline-block;width:.9rem;height:.9rem;margin-right:.35rem;vertical-align:-.1rem;
border:1px solid #0003}
"""
# matplotlib's tab20 with its ten strong colours first, so labels 1..10 (most bundles have fewer) are far apart;
# label v takes LABEL_COLOURS[(v - 1) % 20]. Written out so the legend needs no matplotlib.
LABEL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                 "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
LABEL_ALPHA = 0.55


@dataclass(frozen=True)
class WorkerStats:
    worker: str
    subtasks: int
    windows: int
    seconds: float

    @property
    def windows_per_second(self) -> float:
        return self.windows / self.seconds if self.seconds > 0 else 0.0


def _png(fig: Any) -> str:
    """A matplotlib figure as a data: URI (and the figure closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def time_plot(jobs: list[Job]) -> str | None:
    """Per-volume seconds of the done volumes, split into preprocess, inference (summed subtasks) and merge."""
    done = [j for j in jobs if j.status == Status.DONE and job_elapsed(j) is not None]
    if not done:
        return None
    plt = _pyplot()
    done.sort(key=lambda j: j.finished_at or datetime.min.replace(tzinfo=UTC))
    x = np.arange(len(done))
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    ax.bar(x, [job_elapsed(j) or 0.0 for j in done], color="#c8d6e5", label="elapsed, with queue waits")
    pre = np.array([j.preprocess_seconds or 0.0 for j in done])
    inf = np.array([j.inference_seconds or 0.0 for j in done])
    ax.bar(x, pre, width=0.5, color="#576574", label="preprocess")
    ax.bar(x, inf, width=0.5, bottom=pre, color="#2e86de", label="inference (sum of subtasks)")
    ax.bar(x, [j.merge_seconds or 0.0 for j in done], width=0.5, bottom=pre + inf, color="#ff9f43", label="merge")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("volume (in order of finishing)")
    ax.set_ylabel("seconds")
    ax.set_title("Per-volume time")
    ax.legend(fontsize=7)
    return _png(fig)


def tumour_plot(jobs: list[Job], what: str = "tumour") -> str | None:
    """Histogram of the done volumes' masked mL; ``what`` names it ("labelled" for label maps: all labels)."""
    volumes = [j.tumour_ml for j in jobs if j.status == Status.DONE and j.tumour_ml is not None]
    if not volumes:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=90)
    ax.hist(volumes, bins=min(30, max(5, len(volumes) // 2)), color="#ee5253")
    ax.set_xlabel(f"{what} volume (mL)")
    ax.set_ylabel("volumes")
    ax.set_title(f"{what.capitalize()} volume")
    return _png(fig)


def worker_plot(stats: list[WorkerStats]) -> str | None:
    if not stats:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=90)
    ax.barh([s.worker for s in stats], [s.windows_per_second for s in stats], color="#10ac84")
    ax.set_xlabel("windows per busy second")
    ax.set_title("Per-worker throughput")
    return _png(fig)


def timeline_plot(steps: list[Step]) -> str | None:
    """Each worker's steps over time: GPU parts as the intervals they held the device (busy), the coordinator's
    prepares and merges beneath; white between bars is a device waiting for work."""
    from segq.timeline import busy_interval

    if not steps:
        return None
    plt = _pyplot()
    origin = min(st.started_at for st in steps)
    workers = sorted({st.worker for st in steps}, key=lambda w: (not any(
        st.step == "infer" and st.worker == w for st in steps), w))
    colours = {"infer": "#2e86de", "prepare": "#f39c12", "merge": "#10ac84", "hash": "#8395a7"}  # hash: segq submit
    fig, ax = plt.subplots(figsize=(9.6, 0.45 * len(workers) + 1.2), dpi=90)
    for row, worker in enumerate(workers):
        for kind, colour in colours.items():
            spans = [busy_interval(st) if kind == "infer" else (st.started_at, st.finished_at)
                     for st in steps if st.worker == worker and st.step == kind]
            bars = [((a - origin).total_seconds(), max((b - a).total_seconds(), 1e-3)) for a, b in spans]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour, edgecolors="white", linewidth=0.4, label=kind)
    ax.set_yticks(range(len(workers)), workers)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first step")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper right", fontsize=7, ncol=3)
    ax.set_title("Timeline: GPU parts (device held), prepares and merges (and submit's hashes)")
    return _png(fig)


def busy_table(steps: list[Step]) -> str:
    """Each device worker's busy fraction: over its whole span and in the steady state (all devices working)."""
    from segq.timeline import device_use, steady_window

    overall = device_use(steps)
    if not overall:
        return '<p class="note">no GPU part has run yet</p>'
    window = steady_window(steps)
    steady = {u.worker: u for u in device_use(steps, *window)} if window else {}
    rows_html = "".join(
        f"<tr><td>{html.escape(u.worker)}</td><td>{html.escape(u.device)}</td><td>{u.parts}</td>"
        f"<td>{u.busy_seconds:.1f}</td><td>{u.span_seconds:.1f}</td><td>{u.busy_fraction:.1%}</td>"
        f"<td>{f'{steady[u.worker].busy_fraction:.1%}' if u.worker in steady else ''}</td></tr>" for u in overall)
    return ('<table id="busy"><thead><tr><th>worker</th><th>device</th><th>parts</th><th>busy s</th><th>span s</th>'
            f"<th>busy</th><th>busy, steady state</th></tr></thead><tbody>{rows_html}</tbody></table>")


def _slice_index(mask: np.ndarray) -> int:
    """The middle slice (last axis) through the mask, or through the volume when the mask is empty."""
    hits = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    return int((hits[0] + hits[-1]) // 2) if hits.size else mask.shape[-1] // 2


def label_colour(value: int) -> str:
    """The colour of label ``value`` (> 0) in the overlays and the legend."""
    return LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]


def label_rgba(labels: np.ndarray) -> np.ndarray:
    """A 2D label map as RGBA floats: each label its colour at LABEL_ALPHA, the background transparent."""
    palette = np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] + [LABEL_ALPHA] for c in LABEL_COLOURS])
    values = labels.astype(np.int64, copy=False)
    rgba = palette[(values - 1) % len(LABEL_COLOURS)]
    rgba[values == 0] = 0.0
    return rgba


def overlay_png(input_path: Path, mask_path: Path, size: float = 2.6, source_files: list[str] | None = None,
                labels: bool = False) -> str:
    """The input's middle slice in grey with the mask in red, as a data: URI (``source_files``: a DICOM series);
    ``labels``: the mask is a label map, each label in its colour (label_colour)."""
    import nibabel as nib

    if mask_path.name.endswith(".dcm"):
        raise ValueError("only a DICOM SEG was written; the overlay is drawn from a NIfTI mask")
    mask = np.asarray(nib.load(str(mask_path)).dataobj)
    z = _slice_index(mask)
    if source_files:
        from segq.dicom import load_series

        picture = load_series([Path(f) for f in source_files]).volume[:, :, z]
    else:
        image = nib.load(str(input_path))
        index = (slice(None), slice(None), z) + (0,) * (len(image.shape) - 3)
        picture = np.asarray(image.dataobj[index], dtype=np.float32)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(size, size), dpi=80)
    lo, hi = np.percentile(picture, [1, 99]) if picture.size else (0.0, 1.0)
    ax.imshow(picture.T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if labels:
        ax.imshow(label_rgba(mask[:, :, z].T), origin="lower", interpolation="nearest")
    else:
        ax.imshow(np.ma.masked_equal(mask[:, :, z].T, 0), cmap="autumn", alpha=0.45, origin="lower",
                  interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"slice {z}", fontsize=7)
    return _png(fig)


def worker_stats(job_ids: list[str]) -> list[WorkerStats]:
    """Done subtasks of the jobs' current attempts, per worker."""
    if not job_ids:
        return []
    current = and_(Subtask.job_id == Job.id, Subtask.attempt == Job.attempt)
    with session_scope() as s:
        found = s.execute(select(Subtask.worker, func.count(), func.sum(Subtask.windows), func.sum(Subtask.seconds))
                          .join(Job, current).where(Job.id.in_(job_ids), Subtask.status == Status.DONE,
                                                    Subtask.worker.is_not(None)).group_by(Subtask.worker))
        return [WorkerStats(str(r[0]), int(r[1]), int(r[2] or 0), float(r[3] or 0.0)) for r in found]


def _cell(column: str, row: dict[str, Any]) -> str:
    """A table cell: the user's text (names, errors) escaped for HTML, its control characters shown as escapes."""
    value = row.get(column)
    if value is None:
        return ""
    if column == "input":
        return html.escape(printable(input_shown(row)))
    if column == "status":
        return f'<span class="{html.escape(str(value))}">{html.escape(str(value))}</span>'
    return html.escape(printable(str(value)))


def legend_html(names: dict[int, str]) -> str:
    """The label names, each beside a swatch of its overlay colour."""
    items = "".join(f'<li><span class="swatch" style="background:{label_colour(value)}"></span>'
                    f"{html.escape(name)}</li>" for value, name in sorted(names.items()) if value > 0)
    return f'<ul class="legend">{items}</ul>'


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def label_table(dataset: Dataset, names: dict[int, str]) -> str:
    """Per label of a label-map dataset: the done volumes holding it, its median and total mL, its mean Dice."""
    done = [job for job in dataset.jobs if job.status == Status.DONE]
    lines = []
    for value, name in sorted(names.items()):
        entries = [e for job in done for e in job.labels or [] if int(e["value"]) == value]
        ml = [float(e["ml"]) for e in entries if e.get("ml") is not None]
        scores = [float(e["dice"]) for e in entries if e.get("dice") is not None]
        cells = [f'<span class="swatch" style="background:{label_colour(value)}"></span>{html.escape(name)}',
                 str(value), f"{sum(1 for e in entries if e.get('voxels'))} of {len(done)}",
                 _number(_median(ml)), _number(round(sum(ml), 4) if ml else None),
                 _number(round(sum(scores) / len(scores), 4) if scores else None)]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in ("label", "value", "volumes holding it", "median mL", "total mL",
                                              "mean Dice"))
    return (f'<table class="labels" id="labels-{html.escape(dataset.id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(lines)}</tbody></table>")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _labels_section(datasets: list[Dataset], names: dict[str, dict[int, str] | None]) -> str:
    """Each label-map dataset's legend and label table; nothing for binary masks."""
    parts = []
    for ds in datasets:
        found = names.get(ds.id)
        if found is None:
            continue
        if len(datasets) > 1:
            parts.append(f"<h3>{html.escape(ds.name)} ({html.escape(ds.id)})</h3>")
        parts.append(legend_html(found) + label_table(ds, found))
    return "<h2>Labels</h2>\n" + "\n".join(parts) + "\n" if parts else ""


def _legends(datasets: list[Dataset], names: dict[str, dict[int, str] | None]) -> str:
    """One legend per distinct set of label names, above the mid-slices."""
    distinct = list({tuple(sorted(found.items())): found for ds in datasets if (found := names.get(ds.id))}.values())
    return "".join(legend_html(found) for found in distinct)


def _figure(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<p class="note">{html.escape(alt)}: no data yet</p>'
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"></figure>'


def build_html(datasets: list[Dataset], stats: list[WorkerStats], overlays: dict[str, str | None],
               steps: list[Step] | None = None) -> str:
    """The page. ``overlays`` maps a job id to its mid-slice data: URI (None: the files were unreadable);
    ``steps`` is the datasets' timeline (segq.timeline)."""
    steps = steps or []
    jobs = [job for ds in datasets for job in ds.jobs]
    labelled = {ds.id: label_names(ds) for ds in datasets}
    label_maps = all(found is not None for found in labelled.values())
    data = rows(datasets)
    names = printable(", ".join(f"{ds.name} ({ds.id})" for ds in datasets))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(c, row)}</td>" for c in TABLE_COLUMNS) + "</tr>"
                     for row in data)
    gallery = []
    for job in jobs:
        if job.id not in overlays:
            continue
        caption = html.escape(printable(f"{shown_input(job.input_path, job.output_path, job.channel_files)}: "
                                        f"{job.tumour_ml} mL"))
        uri = overlays[job.id]
        picture = (f'<img src="{uri}" alt="{caption}">' if uri else '<p class="note">image unavailable</p>')
        gallery.append(f'<figure class="volume">{picture}<figcaption>{caption}</figcaption></figure>')
    generated = clock.now().isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>segq report: {html.escape(names)}</title>
<style>{CSS}</style></head>
<body>
<h1>segq report: {html.escape(names)}</h1>
<p class="summary" id="summary">{html.escape(summary_line(summarize(jobs)))}</p>
<p class="note">generated {generated}; model {html.escape(datasets[0].model_sha256[:12])}</p>
<h2>Plots</h2>
<div class="plots">
{_figure(time_plot(jobs), "per-volume time")}
{_figure(tumour_plot(jobs, "labelled" if label_maps else "tumour"), "tumour volume histogram")}
{_figure(worker_plot(stats), "per-worker throughput")}
</div>
<h2>Where the time went</h2>
{_figure(timeline_plot(steps), "timeline")}
{busy_table(steps)}
<h2>Volumes</h2>
<table id="results"><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
{_labels_section(datasets, labelled)}<h2>Mid-slices with the mask</h2>
{_legends(datasets, labelled)}<div class="gallery">
{"".join(gallery) or '<p class="note">no done volumes</p>'}
</div>
</body></html>
"""


def _overlays(jobs: list[Job], limit: int | None, label_maps: set[str] | None = None) -> dict[str, str | None]:
    """Each done job's mid-slice (at most ``limit``); ``label_maps``: the ids of the datasets whose masks are
    label maps."""
    done = [j for j in jobs if j.status == Status.DONE]
    found: dict[str, str | None] = {}
    for job in done[:limit] if limit is not None else done:
        try:
            found[job.id] = overlay_png(Path(job.input_path), Path(job.output_path), source_files=job.source_files,
                                        labels=job.dataset_id in (label_maps or set()))
        except (OSError, ValueError, IndexError, InputError) as exc:  # a moved or unreadable file: say so on the page
            logger.warning("no mid-slice for %s: %s", job.input_path, exc)
            found[job.id] = None
    return found


def busy_lines(steps: list[Step]) -> list[str]:
    """Each device worker's busy fraction as a line for the terminal (what the page's table shows)."""
    from segq.timeline import device_use, steady_window

    window = steady_window(steps)
    steady = {u.worker: u.busy_fraction for u in device_use(steps, *window)} if window else {}
    return [f"{u.worker}: busy {u.busy_fraction:.1%} of {u.span_seconds:.1f} s, {u.parts} part(s)"
            + (f"; {steady[u.worker]:.1%} in the steady state" if u.worker in steady else "")
            for u in device_use(steps)]


def write_report(dataset: str, output: Path, *, max_images: int | None = None) -> tuple[Path, list[str]]:
    """Write the report of the dataset(s) with this id or name to ``output`` (atomically); returns its path and
    each GPU worker's busy fraction as a line to print."""
    ensure_schema()
    datasets = records.datasets(dataset)
    if not datasets:
        raise InputError(f"no dataset with id or name {dataset!r}: see `segq status`")
    jobs = [job for ds in datasets for job in ds.jobs]
    from segq.timeline import load_steps

    steps = load_steps([ds.id for ds in datasets])
    label_maps = {ds.id for ds in datasets if label_names(ds) is not None}
    page = build_html(datasets, worker_stats([j.id for j in jobs]), _overlays(jobs, max_images, label_maps), steps)
    output = output.expanduser().resolve()
    with atomic_path(output) as tmp:
        tmp.write_text(page, encoding="utf-8")
    logger.debug("report of %d volume(s) written to %s (%.1f MB)", len(jobs), output, output.stat().st_size / 1e6)
    return output, busy_lines(steps)
