"""``segq submit``, ``segq status`` and ``segq results``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from segq.modelspec import MODES


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for the <name>_seg.nii.gz masks.")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="model.toml naming the network and checkpoint.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), help="Window overlap (wins over the file).")
@click.option("--sw-batch-size", type=click.IntRange(min=1), help="ROIs per forward pass (wins over the file).")
@click.option("--mode", type=click.Choice(MODES), help="Blending of overlapping windows (wins over the file).")
@click.option("--name", help="Dataset name (default: the output directory's name).")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True)
@click.option("--max-windows-per-subtask", type=click.IntRange(min=1),
              help="Split volumes into subtasks of at most this many windows (default: SEGQ_MAX_WINDOWS_PER_SUBTASK).")
@click.option("--save-probabilities", is_flag=True,
              help="Also write <name>_prob.nii.gz: the merged target-class probability (float32).")
@click.option("--wait", is_flag=True, help="Return when every volume has finished, printing a line each.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
def submit(inputs: tuple[Path, ...], out_dir: Path, model_path: Path, overlap: float | None,
           sw_batch_size: int | None, mode: str | None, name: str | None, priority: str,
           max_windows_per_subtask: int | None, save_probabilities: bool, wait: bool,
           timeout: float | None) -> None:
    """Queue every NIfTI volume in INPUTS (files or directories) for segmentation."""
    from producer.scan import collect_inputs
    from producer.submit import submit as submit_dataset
    from segq.modelspec import load_model_spec

    spec = load_model_spec(model_path).with_overrides(overlap, sw_batch_size, mode)
    items = collect_inputs(list(inputs), out_dir.expanduser().resolve())
    submitted = submit_dataset(items, out_dir, spec, name=name, priority=priority,
                               max_windows_per_subtask=max_windows_per_subtask,
                               save_probabilities=save_probabilities)
    click.echo(f"dataset {submitted.dataset_id}: queued {len(submitted.job_ids)} volume(s)")
    if not wait:
        return
    from producer.wait import wait_for

    jobs = wait_for(submitted.dataset_id, timeout=timeout, echo=click.echo)
    failed = sum(1 for j in jobs if j.status.value != "done")
    click.echo(f"dataset {submitted.dataset_id}: {len(jobs) - failed} done, {failed} failed")
    if failed:
        sys.exit(1)


@click.command()
@click.argument("dataset", required=False)
@click.option("--limit", type=int, default=10, show_default=True, help="Datasets to show (newest first).")
def status(dataset: str | None, limit: int) -> None:
    """Show datasets and their jobs: queued, running, done, failed (with the error)."""
    from rich.console import Console
    from rich.table import Table

    from segq import records
    from segq.db import ensure_schema

    ensure_schema()
    console = Console()
    found = records.datasets(dataset)[:limit]
    if dataset and not found:
        raise click.ClickException(f"no dataset with id or name {dataset!r}")
    styles = {"done": "green", "failed": "red", "running": "yellow", "queued": "blue", "cancelled": "magenta"}
    for ds in found:
        counts: dict[str, int] = {}
        for job in ds.jobs:
            counts[job.status.value] = counts.get(job.status.value, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        table = Table(title=f"dataset {ds.id} '{ds.name}': {summary}", title_justify="left")
        for column in ("job", "input", "status", "windows", "subtasks", "tumour mL", "workers", "error"):
            table.add_column(column, overflow="fold")
        for job in ds.jobs:
            table.add_row(job.id, Path(job.input_path).name, f"[{styles[job.status.value]}]{job.status.value}",
                          str(job.windows or ""), str(job.subtasks or ""),
                          "" if job.tumour_ml is None else f"{job.tumour_ml:.2f}", ",".join(job.workers or []),
                          job.error or "")
        console.print(table)
    if not found:
        console.print("no datasets yet: queue one with `segq submit DIR --out OUT --model model.toml`")


@click.command()
@click.argument("dataset", required=False)
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "table"]), default="table", show_default=True)
def results(dataset: str | None, fmt: str) -> None:
    """One row per volume: paths, status, tumour volume, windows, subtasks, times, workers, backend."""
    from producer.results import rows, to_csv, to_json
    from segq import records
    from segq.db import ensure_schema

    ensure_schema()
    found = records.datasets(dataset)
    if dataset and not found:
        raise click.ClickException(f"no dataset with id or name {dataset!r}")
    data = rows(found)
    if fmt == "csv":
        click.echo(to_csv(data), nl=False)
    elif fmt == "json":
        click.echo(to_json(data))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        shown = ["input", "status", "tumour_voxels", "tumour_ml", "windows", "subtasks", "inference_seconds",
                 "workers", "dice", "error"]
        for column in shown:
            table.add_column(column, overflow="fold")
        for row in data:
            table.add_row(*[Path(str(row[c])).name if c == "input" else "" if row[c] is None else str(row[c])
                            for c in shown])
        Console().print(table)
