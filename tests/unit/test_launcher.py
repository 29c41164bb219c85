"""The per-GPU launcher's pure parts (GPU selection, names, the plan of processes) and its supervision loop
with stand-in child processes (small Python scripts, no Celery)."""

from __future__ import annotations

import io
import logging
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.launcher import (
    EXIT_CONFIG,
    ChildSpec,
    Gpu,
    Launcher,
    RestartPolicy,
    coordinator_processes,
    node_name,
    parse_gpus,
    plan_children,
    visible_devices,
)

FOUR = ["0", "1", "2", "3"]


def no_count() -> int:
    raise AssertionError("the GPU count must not be asked for when CUDA_VISIBLE_DEVICES says it")


@pytest.mark.parametrize(("spec", "visible", "expected"), [
    ("all", FOUR, ["0", "1", "2", "3"]),
    (" ALL ", ["0", "1"], ["0", "1"]),
    ("2", FOUR, ["0", "1"]),
    ("4", FOUR, FOUR),
    ("0,2", FOUR, ["0", "2"]),
    ("3,1", FOUR, ["3", "1"]),
    ("3,", FOUR, ["3"]),
    ("none", FOUR, []),
    ("none", [], []),
    ("all", ["5", "7"], ["5", "7"]),  # CUDA_VISIBLE_DEVICES=5,7 on the launcher
    ("1,", ["5", "7"], ["7"]),
])
def test_parse_gpus_selects(spec: str, visible: list[str], expected: list[str]) -> None:
    assert [g.device for g in parse_gpus(spec, visible)] == expected


@pytest.mark.parametrize(("spec", "visible", "message"), [
    ("all", [], "no GPU is visible on this machine; use --gpus none"),
    ("5", FOUR, "asks for 5 GPU workers but 4 GPU(s) are visible (0, 1, 2, 3)"),
    ("1", [], "asks for 1 GPU workers but 0 GPU(s) are visible"),
    ("0", FOUR, "use --gpus none for CPU workers, or '0,' for GPU 0"),
    ("0,4", FOUR, "GPU 4 does not exist here; 4 GPU(s) are visible"),
    ("0,0", FOUR, "names a GPU twice"),
    ("two", FOUR, "expected all | N"),
    ("-1", FOUR, "expected all | N"),
    ("1,x", FOUR, "expected all | N"),
    (",", FOUR, "expected all | N"),
    ("", FOUR, "expected all | N"),
])
def test_parse_gpus_refuses_with_reasons(spec: str, visible: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_gpus(spec, visible)
    assert message in str(info.value)


def test_visible_devices_counts_only_without_cuda_visible_devices() -> None:
    assert visible_devices(None, lambda: 3) == ["0", "1", "2"]
    assert visible_devices(None, lambda: 0) == []
    assert visible_devices("2,3", no_count) == ["2", "3"]
    assert visible_devices(" 2 , 3 ", no_count) == ["2", "3"]
    assert visible_devices("", no_count) == []
    assert visible_devices("-1", no_count) == []
    assert visible_devices("GPU-aa,GPU-bb", no_count) == ["GPU-aa", "GPU-bb"]


def test_gpu_labels_follow_device_numbers_else_positions() -> None:
    assert [Gpu(0, "5").label, Gpu(1, "GPU-bb").label, Gpu(2, "MIG-x").label] == ["5", "1", "2"]


def test_node_names() -> None:
    host = socket.gethostname()
    assert node_name("gpu0", None) == f"gpu0@{host}"
    assert node_name("gpu0", "box7") == "gpu0@box7"
    assert node_name("coord", "box7") == "coord@box7"
    assert node_name("gpu1", "a@%h") == f"gpu1-a@{host}"
    assert node_name("gpu1", "@box") == "gpu1@box"


def _argv_value(spec: ChildSpec, flag: str) -> str:
    return spec.argv[spec.argv.index(flag) + 1]


def test_plan_pins_one_worker_per_gpu_and_a_coordinator_without_gpu() -> None:
    gpus = parse_gpus("0,2", FOUR)
    plan = plan_children(gpus, hostname="node1", loglevel="DEBUG", extra=["--without-gossip"],
                         base_env={"SEGQ_BROKER_URL": "redis://x"}, cpu_count=16)
    assert [s.name for s in plan] == ["gpu0@node1", "gpu2@node1", "coord@node1"]
    for spec, device in zip(plan[:2], ["0", "2"], strict=True):
        assert spec.env["CUDA_VISIBLE_DEVICES"] == device and spec.env["SEGQ_BROKER_URL"] == "redis://x"
        assert _argv_value(spec, "-Q") == "gpu.high,gpu,gpu.low"
        assert _argv_value(spec, "-c") == "2" and _argv_value(spec, "-n") == spec.name
        assert _argv_value(spec, "--pool") == "threads", "one process, one engine; the threads overlap I/O"
        assert spec.env["OMP_NUM_THREADS"] == "8"
        assert spec.argv[-1] == "--without-gossip" and _argv_value(spec, "-l") == "DEBUG"
        assert "--gpus" not in spec.argv, "a child is a plain worker, never another launcher"
    coordinator = plan[2]
    assert coordinator.env["CUDA_VISIBLE_DEVICES"] == ""
    assert _argv_value(coordinator, "-Q") == ("finish.high,finish,finish.low,"
                                              "coordinator.high,coordinator,coordinator.low")
    assert _argv_value(coordinator, "-c") == "14", "8 processes a GPU worker, within the cores the GPU workers leave"
    assert _argv_value(coordinator, "--pool") == "prefork"


def test_coordinator_scales_with_cores_and_gpus() -> None:
    assert coordinator_processes(4, cpu_count=64) == 32
    assert coordinator_processes(1, cpu_count=16) == 8
    assert coordinator_processes(4, cpu_count=8) == 4, "never more than the cores the GPU workers leave"
    assert coordinator_processes(1, cpu_count=2) == 2, "at least 2"
    assert coordinator_processes(8, cpu_count=128) == 64


def test_plan_for_cpu_workers_and_roles() -> None:
    plan = plan_children(None, cpu_workers=3, hostname="m", base_env={"OMP_NUM_THREADS": "1"}, cpu_count=2,
                         coordinator_concurrency=1)
    assert [s.name for s in plan] == ["cpu0@m", "cpu1@m", "cpu2@m", "coord@m"]
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in plan)
    assert all(s.env["OMP_NUM_THREADS"] == "1" for s in plan[:3]), "a thread count the user set is kept"
    assert _argv_value(plan[3], "-c") == "1"
    assert [s.name for s in plan_children(None, cpu_workers=2, role="gpu", hostname="m")] == ["cpu0@m", "cpu1@m"]
    assert [s.name for s in plan_children(None, role="coordinator", hostname="m")] == ["coord@m"]
    with pytest.raises(ValueError, match="role must be one of"):
        plan_children(None, role="merger")


def test_cli_refuses_bad_gpus_without_importing_torch(tmp_path: Path) -> None:
    """The launcher process never loads torch (so never CUDA), even when it parses and refuses --gpus."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ.update(CUDA_VISIBLE_DEVICES="0,1", SEGQ_DATABASE_URL="sqlite:///{tmp_path}/x.db")
        from click.testing import CliRunner
        from worker.cli import worker
        for args, needle in [(["--gpus", "3"], "asks for 3 GPU workers but 2 GPU(s) are visible (0, 1)"),
                             (["--gpus", "1", "-c", "2"], "--concurrency sets the number of CPU workers"),
                             (["--gpus", "all", "-Q", "gpu"], "-Q does not go with --gpus"),
                             (["--role", "gpu"], "--role gpu needs --gpus")]:
            result = CliRunner().invoke(worker, args)
            assert result.exit_code == 2 and needle in result.output, (args, result.output)
        assert "torch" not in sys.modules, "the launcher imported torch"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def fake(name: str, body: str) -> ChildSpec:
    """A stand-in worker: a Python script instead of `segq worker`."""
    return ChildSpec(name, [sys.executable, "-u", "-c", textwrap.dedent(body)], {})


SLEEPER = """
    import signal, sys, time
    def on(sig, frame):
        print("got", signal.Signals(sig).name, flush=True)
        time.sleep(0.3)
        sys.exit(0 if sig == signal.SIGTERM else 1)
    signal.signal(signal.SIGTERM, on)
    signal.signal(signal.SIGQUIT, on)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
"""


@pytest.fixture
def alarm() -> Iterator[list[float]]:
    """Send this process SIGTERM at the times in the list (seconds from the first), as `docker stop` would."""
    times: list[float] = []
    fired: list[int] = []

    def on_alarm(_sig: int, _frame: object) -> None:
        fired.append(1)
        signal.raise_signal(signal.SIGTERM)
        if len(fired) < len(times):
            signal.setitimer(signal.ITIMER_REAL, times[len(fired)] - times[len(fired) - 1])

    previous = signal.signal(signal.SIGALRM, on_alarm)
    yield times
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def start_alarm(times: list[float], *at: float) -> None:
    times.extend(at)
    signal.setitimer(signal.ITIMER_REAL, at[0])


def test_a_child_that_keeps_crashing_is_given_up_and_the_others_stop_warm(alarm: list[float]) -> None:
    out = io.BytesIO()
    crasher = fake("crash@t", "import sys; print('boom'); sys.exit(3)")
    launcher = Launcher([crasher, fake("sleep@t", SLEEPER)], RestartPolicy(0.05, 0.2, 30, 3), out=out)
    start_alarm(alarm, 3.0)
    assert launcher.run() == 0
    crashed, sleeper = launcher.children
    assert crashed.given_up and crashed.starts == 3 and crashed.exit_codes == [3, 3, 3]
    assert not sleeper.given_up and sleeper.starts == 1 and sleeper.exit_codes == [0]
    text = out.getvalue().decode()
    assert text.count("[crash@t] boom\n") == 3
    assert "[sleep@t] ready\n" in text and "[sleep@t] got SIGTERM\n" in text


def test_every_child_given_up_exits_1(caplog: pytest.LogCaptureFixture) -> None:
    launcher = Launcher([fake("bad@t", "raise SystemExit(2)")], RestartPolicy(0.01, 0.05, 30, 2), out=io.BytesIO())
    assert launcher.run() == 1
    assert "bad@t died 2 times within 30 s of starting (last exit code 2): giving it up" in caplog.text
    assert "every worker process was given up" in caplog.text


def test_a_child_refused_by_preflight_is_given_up_at_once(caplog: pytest.LogCaptureFixture) -> None:
    launcher = Launcher([fake("cfg@t", f"raise SystemExit({EXIT_CONFIG})")], RestartPolicy(0.01, 0.05, 30, 5),
                        out=io.BytesIO())
    assert launcher.run() == 1
    assert launcher.children[0].starts == 1 and launcher.children[0].given_up
    assert "cfg@t cannot start as configured (exit code 78): not restarting it" in caplog.text


def test_deaths_after_a_long_run_are_always_restarted(alarm: list[float]) -> None:
    policy = RestartPolicy(initial_delay=0.05, max_delay=0.4, fast_seconds=0.0, max_fast_crashes=2)
    assert [RestartPolicy(1, 60, 60, 5).delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    launcher = Launcher([fake("flaky@t", "import sys, time; time.sleep(0.1); sys.exit(1)")], policy, out=io.BytesIO())
    start_alarm(alarm, 3.0)
    assert launcher.run() == 0
    child = launcher.children[0]
    assert not child.given_up and child.starts >= 3, child


def test_a_child_that_left_on_its_own_is_not_restarted(alarm: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """Exit 0 is a departure (--max-idle, a SIGTERM of its own), not a crash: the others run on, and the
    launcher exits 0 once every child has left."""
    caplog.set_level(logging.INFO, logger="segq.launcher")
    idle = fake("idle@t", "import time; time.sleep(0.2)")
    launcher = Launcher([idle, fake("sleep@t", SLEEPER)], RestartPolicy(0.01, 0.05, 30, 3), out=io.BytesIO())
    start_alarm(alarm, 2.0)
    assert launcher.run() == 0
    left, sleeper = launcher.children
    assert left.left and left.starts == 1 and left.exit_codes == [0] and not left.given_up
    assert sleeper.starts == 1 and sleeper.exit_codes == [0]
    assert "idle@t left on its own (exit code 0" in caplog.text
    alone = Launcher([fake("idle@t", "pass")], RestartPolicy(0.01, 0.05, 30, 3), out=io.BytesIO())
    assert alone.run() == 0 and alone.children[0].starts == 1
    assert "every worker process left on its own" in caplog.text


def test_second_sigterm_is_a_cold_shutdown(alarm: list[float]) -> None:
    out = io.BytesIO()
    launcher = Launcher([fake("w@t", SLEEPER.replace("time.sleep(0.3)", "time.sleep(1.0)"))], out=out)
    start_alarm(alarm, 1.5, 1.8)
    assert launcher.run() == 0
    text = out.getvalue().decode()
    assert "[w@t] got SIGTERM\n" in text and "[w@t] got SIGQUIT\n" in text, text
    assert launcher.stopping == "cold"
