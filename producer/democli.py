"""``segq demo-data``, ``segq train-demo`` and ``segq evaluate``: the demo model's loop, end to end."""

from __future__ import annotations

import statistics
from pathlib import Path

import click


@click.command("demo-data")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--count", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=2026, show_default=True, help="Training used other seeds.")
def demo_data(out_dir: Path, count: int, seed: int) -> None:
    """Write COUNT synthetic MR-like volumes (OUT/images) with their ground-truth masks (OUT/truth)."""
    from segq.demo import write_demo_dataset

    pairs = write_demo_dataset(out_dir, count, seed=seed)
    click.echo(f"wrote {len(pairs)} volume(s) to {out_dir / 'images'} and their masks to {out_dir / 'truth'}")


@click.command("train-demo")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for model.toml and the checkpoint (the shipped models/demo is replaced only if "
                   "named here).")
@click.option("--arch", default="UNet", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=900, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a model.toml already in OUT.")
def train_demo(out_dir: Path, arch: str, steps: int, seed: int, overwrite: bool) -> None:
    """Train the small demo model on synthetic volumes (CPU, minutes) and write model.toml + checkpoint."""
    from worker.train import train_demo as train

    if (out_dir / "model.toml").exists() and not overwrite:
        raise click.ClickException(f"{out_dir / 'model.toml'} exists: pass --overwrite to replace it, or another --out")
    toml = train(out_dir, arch=arch, steps=steps, seed=seed, progress=True)
    click.echo(f"wrote {toml}")


@click.command()
@click.argument("dataset")
@click.option("--truth", "truth_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory of ground-truth masks named like the inputs.")
@click.option("--replace", is_flag=True, help="Replace Dice scores stored by an earlier evaluation.")
def evaluate(dataset: str, truth_dir: Path, replace: bool) -> None:
    """Dice and volume error of each volume against ground truth; stored and shown by `segq results`."""
    from rich.table import Table

    from producer.cli import console
    from producer.evaluate import evaluate as run
    from segq import records
    from segq.db import ensure_schema

    ensure_schema()
    found = records.one_dataset(dataset)
    scores = run(found.id, truth_dir, replace=replace)
    from producer.terminal import text

    # names are the user's (folders, files, a bundle's labels): Text, never markup, control characters escaped
    table = Table(title=text(f"dataset {found.id} against {truth_dir}"), title_justify="left")
    for column in ("input", "Dice", "volume error mL", "note"):
        table.add_column(column)
    for s in scores:
        table.add_row(text(Path(s.input_path).name), "" if s.dice is None else f"{s.dice:.4f}",
                      "" if s.volume_error_ml is None else f"{s.volume_error_ml:+.2f}", text(s.note))
    console().print(table)
    values = [s.dice for s in scores if s.dice is not None]
    if values:
        click.echo(f"mean Dice {statistics.mean(values):.4f} over {len(values)} volume(s)")
