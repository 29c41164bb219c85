"""One typed settings object; the only reader of ``os.environ`` in segq.

Values come from, highest first: the environment (prefix ``SEGQ_``), a TOML settings file
(``SEGQ_CONFIG``, else ``./segq.toml`` when present), then defaults that make the embedded
setup (local Redis, SQLite, local storage) work with nothing set.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

Backend = Literal["torch", "onnxruntime", "tensorrt", "simulate"]
Precision = Literal["fp32", "fp16", "bf16"]
# auto (the default): on a GPU in fp16, torch.compile the network's repeated blocks one by one (regional: 9.9 s
# from inductor's cache against 66 s for the whole network on an H200, as fast) where it has blocks segq knows
# (SwinUNETR, UNet, SegResNet), else the whole network; eager otherwise (worker/engines/compiling.py). off;
# regional; a torch.compile mode for the whole network by name (worker/engines/torch_engine.compile_options); aot,
# an AOTInductor package; or precompile, torch.compile with dynamo's result saved too (both in
# worker/engines/aot.py; where the installed PyTorch lacks their API, what auto picks, said in one line).
TorchCompile = Literal["auto", "off", "regional", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "aot",
                       "precompile"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "segq"


class Settings(BaseSettings):
    """Everything a producer or worker needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix="SEGQ_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    database_url: str | None = None
    data_dir: Path = Field(default_factory=_default_data_dir)
    storage: Path | None = None
    # Scheduling (segq/scheduler.py). A GPU part never holds more than max_windows_per_subtask windows;
    # below that cap a volume is cut only when GPUs would otherwise wait (scheduler.split_parts).
    max_windows_per_subtask: int = Field(default=1024, ge=1)
    # Volumes admitted ahead of the one each GPU worker runs: at most gpu_workers x (lookahead + 1) volumes
    # are prepared, on a GPU or merging at once; the rest wait in SQL, not as workspaces.
    # Unset: 3, or more while the timeline shows a volume's prepare outlasting its GPU time (scheduler.paced_lookahead).
    lookahead: int | None = Field(default=None, ge=0)
    # `segq submit` queues a dataset's first submit_ahead volumes before their content hash is known: their prepare
    # starts while submit hashes, and prepare goes on only once the hash is recorded and equals what it read
    # (producer/submit.py, worker/submitted.py). 0: hash every input first, as before. A prepare that waited
    # submit_hash_wait seconds for the hash (that submit stopped) fails its job, saying so.
    submit_ahead: int = Field(default=4, ge=0)
    submit_hash_wait: float = Field(default=300.0, gt=0)
    # Seconds between a worker's heartbeat and admission sweep (a safety net: steps admit as they end).
    admit_interval: float = Field(default=5.0, gt=0)
    # Tasks a launcher GPU worker holds at once: one on the device, the others reading their input or
    # writing their partial meanwhile (threads pool; the device itself runs one at a time).
    gpu_prefetch: int = Field(default=2, ge=1)
    # Streaming (worker/streaming.py): a part of a volume cut in several waits for its rows of the input while
    # prepare writes them; one that sees no new row for this many seconds raises StreamStalledError (retried).
    stream_stall_seconds: float = Field(default=120.0, gt=0)
    # How long writing a streamed input takes against one GPU running all the volume's windows (0: parts of equal
    # windows). Later parts' rows arrive later, so with a ratio > 0 they get fewer windows and the GPUs finish
    # together (segq.scheduler.part_windows).
    stream_ratio: float = Field(default=0.0, ge=0, le=10)
    # A volume nothing else waits behind is cut into at least this many streamed parts, however few GPUs there are
    # (segq.scheduler.split_parts; 1: one part a GPU, as for a dataset's tail).
    lone_parts: int = Field(default=2, ge=1, le=64)
    # Threads ISA-L's igzip uses to deflate a .nii.gz mask (worker/jobs.py); 1 writes it in this thread, 0 gives a
    # quarter of this process' cores, 2 to 4.
    gzip_threads: int = Field(default=0, ge=0)
    # Threads that inflate a large .nii.gz at prepare, through rapidgzip where it is installed (segq.volumes): 0
    # gives this process' cores (at most 16), 1 inflates with ISA-L in one thread.
    inflate_threads: int = Field(default=0, ge=0, le=256)
    backend: Backend = "torch"
    # TEST ONLY (SEGQ_BACKEND=simulate, worker/simulate.py): a GPU part sleeps this long a window instead of
    # running a network (9.4 ms: SwinUNETR fs48 fp16 on an H200), and a worker process stands for
    # simulate_devices GPUs; bench/simulate.py loads the orchestration with dozens of them on one CPU machine.
    simulate_seconds_per_window: float = Field(default=0.0094, ge=0)
    simulate_devices: int = Field(default=1, ge=1)
    precision: Precision = "fp32"
    # A bundle's partials carry every output channel (105 for wholeBody_ct_segmentation). float16 halves what
    # each part writes and merge reads (merge adds in float32), but moved labels at near-ties: 0.9990 to 0.99993
    # of voxels equal to monai.bundle run's against 1.0 for float32 (docs/MODELS.md). So float32 by default.
    # A model.toml's one-channel partials are always float32.
    partial_dtype: Literal["float16", "float32"] = "float32"
    # Where a bundle's preprocessing runs after its readers (LoadImaged, EnsureChannelFirstd): "auto" runs it on
    # the GPU worker for a case that goes in one part (milliseconds there against a CT's 1-2 s of Spacingd on
    # a coordinator's CPU); "coordinator" runs all of it at prepare, as a case split into several parts always is.
    bundle_preprocess: Literal["auto", "coordinator"] = "auto"
    device: str = "auto"
    torch_compile: TorchCompile = "auto"
    # Inference engines (worker/engines): ONNX files and TensorRT plans are cached per model under
    # engine_dir (default <storage>/engines), so every worker on a machine loads what one built.
    engine_dir: Path | None = None
    engine_build: bool = True
    trt_min_batch: int = Field(default=1, ge=1)
    trt_opt_batch: int = Field(default=8, ge=1)
    trt_max_batch: int = Field(default=16, ge=1)
    trt_workspace_gb: float = Field(default=10.0, gt=0)
    gate_min_dice: float = Field(default=0.99, ge=0, le=1)
    # A passed gate's verdict is kept under engine_dir per engine, PyTorch, GPU and checkpoint, and a start that
    # matches all of them reads it instead of running the gate again (worker/engines/verdicts.py). false: always run.
    gate_cache: bool = True
    # Inductor's on-disk cache (compiled kernels and graphs), kept between starts. Unset: <engine_dir>/inductor.
    # A compiling engine points PyTorch's own TORCHINDUCTOR_CACHE_DIR here (worker/engines/torch_engine.py).
    inductor_cache_dir: Path | None = None
    # Celery reliability: the visibility timeout must exceed the hard time limit, or Redis
    # redelivers a task that is still running.
    task_time_limit: int = Field(default=3600, ge=10)
    visibility_timeout: int = Field(default=7200, ge=20)
    result_expires: int = Field(default=7 * 24 * 3600, ge=3600)
    max_retries: int = Field(default=3, ge=0)
    max_deliveries: int = Field(default=3, ge=1)
    # A step that cannot reach the database waits and tries again for this long before it gives up (worker/steps.py).
    db_outage_limit: int = Field(default=900, ge=10)
    max_voxels: int = Field(default=1024**3, ge=1)
    job_deadline: int = Field(default=6 * 3600, ge=60)
    # Reliability (docs/RELIABILITY.md). Directories inputs may be read from and outputs written to,
    # separated by ':'; empty means anywhere this user may. The watchdog fails jobs running past
    # job_deadline; each worker sweeps every watchdog_interval seconds (0: only `segq watchdog`).
    allowed_roots: str = ""
    watchdog_interval: int = Field(default=300, ge=0)
    # Leaving (worker/leaving.py): on SIGTERM a worker finishes the GPU parts that end within stop_grace seconds and
    # hands the others back, and is gone within stop_grace + 5 s. max_idle > 0 (`segq worker --max-idle N`): a
    # worker that has had no task for that many seconds leaves by itself (exit 0; the launcher does not restart it).
    stop_grace: float = Field(default=20.0, ge=0)
    max_idle: float = Field(default=0.0, ge=0)
    # Every this many seconds each worker pings the others; a subtask running on a worker that missed two
    # pings in a row is re-queued (a new attempt of its job), not left to the visibility timeout. 0: off.
    dead_worker_interval: int = Field(default=30, ge=0)
    # TEST ONLY (segq/faults.py): injected faults such as "kill_in_infer_slab:slab=1:times=1", and the
    # directory whose files count their hits across processes. No effect unless set.
    faults: str = ""
    faults_dir: Path | None = None
    log_level: str = "INFO"
    # Not SEGQ_-prefixed: the GPUs this process may use, as CUDA sets them. The worker launcher hands
    # out only these (a container or a shared machine may expose a subset).
    cuda_visible_devices: str | None = Field(default=None, validation_alias="CUDA_VISIBLE_DEVICES")
    # Not SEGQ_-prefixed either: threads a process's torch/OpenMP uses. Unset, a plain `segq worker` shares the
    # host's cores among the worker processes on it (worker/threads.py); the launcher sets it for its children.
    omp_num_threads: str | None = Field(default=None, validation_alias="OMP_NUM_THREADS")  # OpenMP allows "4,2"

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        """SEGQ_TORCH_COMPILE=1/true/on compiles with the default mode, 0/false/off runs eager."""
        text = str(value).strip().lower()
        return "default" if text in ("1", "true", "yes", "on") else "off" if text in ("0", "false", "no") else text

    @field_validator("visibility_timeout")
    @classmethod
    def _visibility_above_limit(cls, value: int, info: Any) -> int:
        limit = info.data.get("task_time_limit", 0)
        if value <= limit:
            raise ValueError(
                f"SEGQ_VISIBILITY_TIMEOUT ({value}s) must be longer than SEGQ_TASK_TIME_LIMIT ({limit}s), "
                "or Redis hands a running task to a second worker"
            )
        return value

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'segq.db'}"

    @property
    def storage_root(self) -> Path:
        return (self.storage or self.data_dir / "storage").expanduser().resolve()

    @property
    def allowed_root_paths(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.allowed_roots.split(os.pathsep) if p.strip()]

    @property
    def engine_root(self) -> Path:
        return (self.engine_dir or self.storage_root / "engines").expanduser().resolve()

    @property
    def inductor_root(self) -> Path:
        return (self.inductor_cache_dir or self.engine_root / "inductor").expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("SEGQ_CONFIG")
        path = Path(config) if config else Path("segq.toml")
        if config and not path.is_file():
            raise FileNotFoundError(f"SEGQ_CONFIG names {path}, which is not a file")
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def child_environment(**overrides: str) -> dict[str, str]:
    """A copy of this process's environment with overrides, for the worker launcher's children."""
    env = dict(os.environ)
    env.update(overrides)
    return env
