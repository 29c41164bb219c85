"""``segq export-onnx`` and ``segq build-engine``: the PyTorch -> ONNX -> TensorRT path from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from segq.errors import EngineError, InputError

if TYPE_CHECKING:
    import numpy as np

    from segq.modelspec import ModelSpec


@click.command("export-onnx")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A model.toml naming the network and checkpoint, or a MONAI bundle (folder or .zip).")
@click.option("--trust-model", is_flag=True, help="Run a MONAI bundle's config as code (see segq submit).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="ONNX file to write (a sidecar <output>.json records the model and the check).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 puts the network in fp16 inside the graph (float32 in and out): for TensorRT 11, "
                   "which builds only strongly typed networks.")
@click.option("--check-batch", type=click.IntRange(min=1), default=2, show_default=True,
              help="ROIs in the random batch run in ONNX Runtime and PyTorch to check the export.")
def export_onnx(model_path: Path, output: Path, precision: str, check_batch: int, trust_model: bool) -> None:
    """Export the model (a model.toml's target-class softmax, or a bundle's every channel, inside the graph;
    dynamic batch) and check it in ONNX Runtime."""
    from segq.pipeline import load_pipeline
    from worker.engines.onnx_export import TOLERANCE
    from worker.engines.onnx_export import export_onnx as run_export

    spec = load_pipeline(model_path, trust=trust_model)
    meta = run_export(spec, output.expanduser().resolve(), precision, check_batch)
    click.echo(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, opset {meta.opset}, {precision}, "
               f"input {meta.input_name} [batch, {meta.in_channels}, {', '.join(map(str, meta.roi))}])")
    click.echo(f"ONNX Runtime vs PyTorch on a random batch of {check_batch}: max |diff| {meta.max_abs_diff:.2e} "
               f"(limit {TOLERANCE[precision]:g}); onnx sha256 {meta.onnx_sha256[:16]}")


def _reference(path: Path | None, spec: ModelSpec) -> np.ndarray | None:
    import numpy as np

    from segq.settings import get_settings
    from segq.volumes import load_volume
    from worker.jobs import preprocess

    if path is None:
        return None
    volume, _affine, _header = load_volume(path, spec.in_channels, get_settings().max_voxels)
    return np.ascontiguousarray(preprocess(volume, spec.preprocess), dtype=np.float32)


def _model_for(onnx: Path, model_path: Path | None) -> ModelSpec:
    """The model.toml to gate against: --model, else the one recorded when the ONNX was exported."""
    from segq.pipeline.toml import load_model_spec
    from worker.engines.onnx_export import OnnxMeta

    meta = OnnxMeta.read(onnx)
    recorded = Path(meta.model_path) if meta and meta.model_path else None
    path = model_path or recorded
    if path is None or not path.is_file():
        raise InputError(f"the accuracy gate needs the model {onnx} came from: pass --model model.toml "
                         "(or --skip-gate to keep an unchecked plan)")
    spec = load_model_spec(path)
    if meta is not None and meta.model_sha256 != spec.checksum():
        raise InputError(f"{path} is not the model {onnx} was exported from (checksums differ); pass the right "
                         "--model or export again")
    return spec


@click.command("build-engine")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="ONNX file written by `segq export-onnx`.")
@click.option("--fp16", is_flag=True, help="Build an fp16 plan (default fp32).")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workspace-gb", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="TensorRT's workspace memory pool limit.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Plan file or directory (default: the engine cache, SEGQ_STORAGE/engines/<model>/, where "
                   "workers look).")
@click.option("-m", "--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="model.toml for the accuracy gate (default: the one recorded at export).")
@click.option("--reference", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="NIfTI volume for the accuracy gate (default: a synthetic volume of 1.5 ROIs a side).")
@click.option("--min-dice", type=click.FloatRange(0, 1), default=None,
              help="Refuse the plan below this Dice against fp32 PyTorch (default: SEGQ_GATE_MIN_DICE, 0.99).")
@click.option("--skip-gate", is_flag=True, help="Keep the plan without the accuracy gate (not recommended).")
def build_engine(onnx_path: Path, fp16: bool, min_batch: int, opt_batch: int, max_batch: int, workspace_gb: float,
                 output: Path | None, model_path: Path | None, reference: Path | None, min_dice: float | None,
                 skip_gate: bool) -> None:
    """Build a TensorRT plan for this machine's GPU (what trtexec --onnx --saveEngine --fp16 --minShapes
    --optShapes --maxShapes does), gate its accuracy against fp32 PyTorch, and store it with a sidecar."""
    from segq.settings import get_settings
    from worker.engines.cache import build_and_gate
    from worker.engines.files import model_dir
    from worker.engines.onnx_export import OnnxMeta
    from worker.engines.plans import Profile, plan_name
    from worker.engines.trt_build import current_target, tensorrt_module

    tensorrt_module("segq build-engine needs TensorRT")
    import torch

    settings = get_settings()
    precision = "fp16" if fp16 else "fp32"
    profile = Profile(min_batch, opt_batch, max_batch)
    onnx = onnx_path.expanduser().resolve()
    meta = OnnxMeta.read(onnx)
    spec = None if skip_gate else _model_for(onnx, model_path)
    model_sha = meta.model_sha256 if meta else None
    target = current_target(0)
    if output is None or output.is_dir():
        if model_sha is None:
            raise InputError(f"{onnx} has no sidecar naming its model: pass -o PLAN (or export with segq export-onnx)")
        name = plan_name(model_sha, target, precision, profile)
        output = (output / name) if output is not None else model_dir(settings.engine_root, model_sha) / name
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        plan_meta = build_and_gate(onnx, output, precision, profile, workspace_gb, spec, torch.device("cuda:0"),
                                   _reference(reference, spec) if spec else None,
                                   settings.gate_min_dice if min_dice is None else min_dice, click.echo)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from exc
    gate = plan_meta.accuracy
    click.echo(f"wrote {output} for {target.gpu_name} (sm {target.compute_capability}, TensorRT {target.trt_version})")
    if gate:
        click.echo(f"accuracy gate: Dice {gate['dice']:.5f}, voxel agreement {gate['agreement']:.5%} vs fp32 PyTorch")


@click.command("warm-engine")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A model.toml naming the network and checkpoint, or a MONAI bundle (folder or .zip).")
@click.option("--trust-model", is_flag=True, help="Run a MONAI bundle's config as code (see segq submit).")
@click.option("--sw-batch-size", type=click.IntRange(min=1), default=None,
              help="The ROI batch the datasets will use (default: the model's); a compiled engine is built per batch.")
def warm_engine(model_path: Path, sw_batch_size: int | None, trust_model: bool) -> None:
    """Build the engine this machine's workers will load (SEGQ_BACKEND, SEGQ_PRECISION, SEGQ_TORCH_COMPILE),
    run its accuracy gate, and leave it in the engine cache: run once per machine after an install or upgrade,
    so no worker pays the first compile (about 100 s for SwinUNETR on an H200). A torch.compile start from
    inductor's cache still traces the network (about 85 s there); an AOT package loads in seconds."""
    import time

    from segq.pipeline import load_pipeline
    from segq.settings import get_settings
    from worker.runtime import engine_for

    settings = get_settings()
    spec = load_pipeline(model_path, trust=trust_model)
    started = time.perf_counter()
    spec, engine = engine_for(spec.to_dict(), spec.checksum(), settings, sw_batch_size)
    mode = getattr(engine, "compile_mode", None)
    click.echo(f"{engine.backend} {engine.precision} engine on {engine.device}"
               + (f", torch.compile {mode} (ROI batch {spec.sw_batch_size})" if mode else "")
               + f": ready in {time.perf_counter() - started:.1f} s; cache {settings.engine_root}")
