"""``segq submit``, ``status``, ``results``, ``watch``, ``resume``, ``retry``, ``cancel`` and ``report``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from segq.modelspec import MODES


def console() -> Any:
    """A rich console; piped or logged output gets a wide line instead of rich's 80-column default."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def exit_on_failures(jobs: list[Any], title: str, label: str) -> None:
    """Print the closing count; exit 1 when any volume did not end done (scripts and cron see it)."""
    from segq.models import Status

    failed = sum(1 for j in jobs if j.status != Status.DONE)
    click.echo(f"{title}: {len(jobs) - failed} done, {failed} {label}")
    if failed:
        sys.exit(1)


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for the <name>_seg.nii.gz masks.")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A model.toml naming the network and checkpoint, or a MONAI bundle (its folder or .zip).")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), help="Window overlap (wins over the file).")
@click.option("--sw-batch-size", type=click.IntRange(min=1), help="ROIs per forward pass (wins over the file).")
@click.option("--mode", type=click.Choice(MODES), help="Blending of overlapping windows (wins over the file).")
@click.option("--name", help="Dataset name (default: the output directory's name).")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True)
@click.option("--max-windows-per-subtask", type=click.IntRange(min=1),
              help="Split volumes into subtasks of at most this many windows (default: SEGQ_MAX_WINDOWS_PER_SUBTASK).")
@click.option("--save-probabilities", is_flag=True,
              help="Also write <name>_prob.nii.gz: the merged target-class probability (float32).")
@click.option("--output-format", type=click.Choice(["auto", "nifti", "dicom-seg", "both"]), default="auto",
              show_default=True, help="Masks as NIfTI, DICOM SEG or both; auto: NIfTI for NIfTI inputs, both for "
                                      "DICOM series (a SEG needs a DICOM series to reference).")
@click.option("--overwrite", is_flag=True,
              help="Take over output paths another dataset owns (its jobs for them are cancelled, saying why).")
@click.option("--wait", is_flag=True, help="Return when every volume has finished, printing a line each.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--timings", is_flag=True,
              help="Print on stderr one line, 'timings {json}': seconds from this process' start to its imports, "
                   "checks, first job row, first prepare message and recorded hashes, and each input's hash.")
@click.option("--trust-model", is_flag=True,
              help="Run a MONAI bundle's config as code: any _target_, $ expression and import it holds. Without it, "
                   "only MONAI and torch.nn classes and literal expressions run (docs/MODELS.md).")
@click.option("--datalist", type=click.Path(path_type=Path, dir_okay=False),
              help="A JSON (as MONAI writes it) or CSV file naming cases and their channel files, relative to its "
                   "folder; masks go to <out>/<case>_seg.nii.gz. INPUTS are then optional.")
def submit(inputs: tuple[Path, ...], out_dir: Path, model_path: Path, overlap: float | None,
           sw_batch_size: int | None, mode: str | None, name: str | None, priority: str,
           max_windows_per_subtask: int | None, save_probabilities: bool, output_format: str, overwrite: bool,
           wait: bool, timeout: float | None, timings: bool, trust_model: bool, datalist: Path | None) -> None:
    """Queue every NIfTI volume and DICOM series in INPUTS (files or directories), and every case of --datalist,
    for segmentation.

    DICOM files are found by content (any name); each series is one volume. For a model of several channels,
    files named <case>_0000.nii.gz to _000N are one case per directory. A DICOM file or series, or a case, that
    cannot be segmented is refused with one line on stderr and the rest is queued; with --wait the exit
    status is then 1.
    """
    if not inputs and datalist is None:
        raise click.UsageError("pass INPUTS (NIfTI files, DICOM series or directories), --datalist FILE, or both")
    from producer.timings import Timings

    marks = Timings()
    marks.mark("command")
    from producer.scan import collect
    from producer.submit import check_dataset_name
    from producer.submit import submit as submit_dataset
    from segq.pipeline import load_pipeline
    from segq.storage import printable

    marks.mark("imported")

    if name:
        check_dataset_name(name)  # before the scan and the model load: a bad --name costs nothing

    from segq.settings import get_settings

    bundles = get_settings().storage_root / "bundles"
    spec = load_pipeline(model_path, trust=trust_model, unpack_into=bundles, cache=bundles / "read").with_overrides(
        overlap, sw_batch_size, mode)
    if save_probabilities and spec.is_bundle:
        raise click.UsageError("--save-probabilities writes a model.toml's target probability; a bundle's "
                               "postprocessing decides on its own grid, so it has none to save")
    marks.mark("model_loaded")
    collected = collect(list(inputs), out_dir.expanduser().resolve(), output_format, in_channels=spec.in_channels,
                        datalist=datalist)
    marks.mark("scanned")
    # every input refused: the error names each one
    submitted = submit_dataset(collected.inputs, out_dir, spec, name=name, priority=priority,
                               max_windows_per_subtask=max_windows_per_subtask,
                               save_probabilities=save_probabilities, refused=[r.line() for r in collected.refused],
                               overwrite=overwrite, timings=marks)
    if timings:
        click.echo(marks.line(), err=True)
    for refusal in submitted.refused:
        click.echo(f"refused {printable(refusal)}", err=True)
    again = " (same dataset as before)" if submitted.reused_dataset else ""
    refused = f", {len(submitted.refused)} refused" if submitted.refused else ""
    click.echo(f"dataset {submitted.dataset_id}: queued {len(submitted.queued)} volume(s), "
               f"{len(submitted.done)} already done{refused}{again}")
    if not wait:
        return
    from producer.wait import wait_for

    jobs = wait_for(submitted.dataset_id, timeout=timeout, echo=click.echo)
    if submitted.refused:
        click.echo(f"{len(submitted.refused)} input(s) refused at submit (above)")
    exit_on_failures(jobs, f"dataset {submitted.dataset_id}", "failed")
    if submitted.refused:
        sys.exit(1)


@click.command()
@click.argument("dataset", required=False)
@click.option("--limit", type=int, default=10, show_default=True, help="Datasets to show (newest first).")
def status(dataset: str | None, limit: int) -> None:
    """Show datasets and their jobs: queued, running, done, failed (with the error)."""
    from rich.table import Table

    from producer.cases import shown_input
    from producer.terminal import text
    from segq import records
    from segq.db import ensure_schema

    ensure_schema()
    out = console()
    found = records.datasets(dataset)[:limit]
    if dataset and not found:
        raise click.ClickException(f"no dataset with id or name {dataset!r}")
    styles = {"done": "green", "failed": "red", "running": "yellow", "queued": "blue", "cancelled": "magenta"}
    for ds in found:
        counts: dict[str, int] = {}
        for job in ds.jobs:
            counts[job.status.value] = counts.get(job.status.value, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        # names, errors and workers are user-supplied: Text cells, never parsed as markup
        table = Table(title=text(f"dataset {ds.id} '{ds.name}': {summary}"), title_justify="left")
        for column in ("job", "input", "status", "windows", "subtasks", "tumour mL", "workers", "error"):
            table.add_column(column, overflow="fold")
        for job in ds.jobs:
            table.add_row(job.id, text(shown_input(job.input_path, job.output_path, job.channel_files)),
                          text(job.status.value, styles[job.status.value]),
                          str(job.windows or ""), str(job.subtasks or ""),
                          "" if job.tumour_ml is None else f"{job.tumour_ml:.2f}", text(",".join(job.workers or [])),
                          text(job.error or ""))
        out.print(table)
    if not found:
        out.print("no datasets yet: queue one with `segq submit DIR --out OUT --model model.toml`")


@click.command()
@click.argument("dataset", required=False)
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "table"]), default="table", show_default=True)
@click.option("--summary/--no-summary", default=True, show_default=True,
              help="Add a summary line (counts, wall and median times, throughput): on stderr for csv and json, "
                   "so stdout stays machine-readable; as the last line for the table.")
def results(dataset: str | None, fmt: str, summary: bool) -> None:
    """One row per volume: paths, status, tumour volume, windows, subtasks, times, workers, backend.

    A label map's dataset adds each label's voxels, mL and Dice (the table shows its mL, and Dice once scored).
    """
    from producer.results import input_shown, rows, summarize, summary_line, table_columns, to_csv, to_json
    from segq import records
    from segq.db import ensure_schema

    ensure_schema()
    found = records.datasets(dataset)
    if dataset and not found:
        raise click.ClickException(f"no dataset with id or name {dataset!r}")
    data = rows(found)
    line = summary_line(summarize([job for ds in found for job in ds.jobs]))
    if fmt == "csv":
        click.echo(to_csv(data), nl=False)
    elif fmt == "json":
        click.echo(to_json(data))
    if fmt != "table":
        if summary:
            click.echo(line, err=True)
    else:
        from rich.table import Table

        from producer.terminal import text

        table = Table()
        shown = table_columns(data, found)
        for column in shown:
            table.add_column(text(column), overflow="fold")  # a label's columns carry its name
        for row in data:
            table.add_row(*[text(input_shown(row) if c == "input" else row[c]) for c in shown])
        console().print(table)
        if summary:
            click.echo(line)


def _watched(dataset: str | None) -> list[tuple[str, str]]:
    """(id, name) of the datasets to follow: those named, else every one with unfinished jobs, else the newest."""
    from segq import records
    from segq.db import ensure_schema

    ensure_schema()
    found = records.datasets(dataset)
    if dataset and not found:
        raise click.ClickException(f"no dataset with id or name {dataset!r}")
    if not dataset:
        open_ = [ds for ds in found if any(not job.status.final for job in ds.jobs)]
        found = open_ or found[:1]
    if not found:
        raise click.ClickException("no datasets yet: queue one with `segq submit DIR --out OUT --model model.toml`")
    return [(ds.id, ds.name) for ds in found]


@click.command()
@click.argument("dataset", required=False)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit status 3).")
@click.option("--poll", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between looks.")
def watch(dataset: str | None, timeout: float | None, poll: float) -> None:
    """Follow DATASET (default: every unfinished one) until it ends: a live display, or a line per volume.

    Reads only the database, so it works from any machine that reaches it. Exit status 1 when a volume
    failed or was cancelled.
    """
    from producer.wait import follow
    from segq.storage import printable

    watched = _watched(dataset)
    title = printable(", ".join(f"dataset {ds_id} '{name}'" for ds_id, name in watched))
    try:
        jobs = follow([ds_id for ds_id, _ in watched], timeout=timeout, poll=poll, echo=click.echo, title=title)
    except TimeoutError as exc:
        click.echo(str(exc), err=True)
        sys.exit(3)
    exit_on_failures(jobs, title, "failed or cancelled")


@click.command()
@click.argument("dataset", required=False)
def resume(dataset: str | None) -> None:
    """Re-queue exactly the unfinished (queued or running) jobs of DATASET (default: of every dataset).

    For after an outage (workers killed, Redis restarted): each goes again as a new attempt, and any of
    its old messages still in Redis are ignored. Done, failed and cancelled jobs are not touched.
    """
    from producer.manage import resume as resume_jobs

    requeued = resume_jobs(dataset)
    click.echo(f"re-queued {len(requeued)} unfinished job(s)")


@click.command()
@click.argument("dataset", required=False)
@click.option("--failed", is_flag=True, help="Re-queue the failed jobs.")
@click.option("--cancelled", is_flag=True, help="Re-queue the cancelled jobs.")
def retry(dataset: str | None, failed: bool, cancelled: bool) -> None:
    """Re-queue the failed (and/or cancelled) jobs of DATASET (default: of every dataset), after fixing the cause."""
    from producer.manage import retry as retry_jobs

    requeued = retry_jobs(dataset, failed=failed, cancelled=cancelled)
    click.echo(f"re-queued {len(requeued)} job(s)")


@click.command()
@click.argument("target")
def cancel(target: str) -> None:
    """Cancel the unfinished jobs of a dataset (id or name), or one job (id).

    Running tasks stop at their next ROI batch, queued ones are revoked, and their workspaces and
    temp files are deleted; masks of jobs already done stay.
    """
    from producer.manage import cancel as cancel_jobs

    cancelled = cancel_jobs(target)
    click.echo(f"cancelled {len(cancelled)} job(s)")


@click.command()
@click.argument("dataset")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The HTML file to write (self-contained: styles and images inline).")
@click.option("--max-images", type=click.IntRange(min=0), default=None,
              help="Mid-slice images for at most this many volumes (default: every done volume).")
def report(dataset: str, output: Path, max_images: int | None) -> None:
    """Write a self-contained HTML report of DATASET: table, summary, plots and a mid-slice per volume."""
    from producer.report import write_report

    path, busy = write_report(dataset, output, max_images=max_images)
    for line in busy:
        click.echo(line)
    click.echo(f"wrote {path}")
