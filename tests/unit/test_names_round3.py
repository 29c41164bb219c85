"""Round three (issue 24, items 3, 7 and 11): real datasets' names accepted, dangerous ones refused, all of them
named at once, and every name shown as text (terminal, CSV, HTML), never as markup or escape codes.

End to end, with a worker and `segq submit`, in tests/integration/test_names_round3.py.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from producer.scan import collect, collect_inputs, output_family
from producer.submit import check_dataset_name
from segq.errors import InputError
from segq.models import Status
from segq.storage import (
    atomic_path,
    filesystem_limits,
    length_problem,
    name_problem,
    output_path,
    printable,
    remove_stale_temps,
    require_output_inside,
    temp_name,
)
from tests.helpers import environment

REAL_NAMES = ["Patient 001.nii.gz", "M\u00fcller_T1.nii.gz", "\u60a3\u8005_001.nii.gz", "\u0645\u0631\u064a\u0636.nii",
              "x;rm -rf ~.nii.gz", "it's \"quoted\".nii.gz", "[link=evil.example]a[red].nii.gz",
              "scan*?[1].nii.gz", "-rf.nii.gz", "=HYPERLINK(1).nii.gz"]
HOSTILE = "[link=http://evil.example]click[/link] \x1b[2J\x1b[31mred"  # markup, clear screen, recolour
HOSTILE_FILE = "[link=evil.example]click \x1b[2J\x1b[31mred"  # the same as a file name can be (no /)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


# --- item 3: names the filesystem allows are accepted, unless they could escape --out --------------------------

def test_real_datasets_names_are_accepted_and_stay_inside_out(tmp_path: Path) -> None:
    for name in REAL_NAMES:
        touch(tmp_path / "scans" / "Stra\u00dfe 2" / name)
    out = (tmp_path / "out").resolve()
    found = collect_inputs([tmp_path / "scans"], out)
    assert sorted(item.path.name for item in found) == sorted(REAL_NAMES)
    for item in found:
        assert item.output.parent == out / "Stra\u00dfe 2" and item.output.name.endswith("_seg.nii.gz")
        require_output_inside(item.output, out, [])  # the worker's check agrees


@pytest.mark.parametrize(("part", "why"), [
    ("..", "names no file"), (".", "names no file"), ("", "names no file"), ("a/b", "path separator"),
    ("nul\x00.nii", "control characters"), ("esc\x1b[2J.nii", r"control characters \(\\x1b\)"),
    ("bell\x07.nii", "control characters"), ("del\x7f.nii", "control characters"),
    ("csi\x9b2J.nii", r"\\x9b"), ("cr\r.nii", "control characters"),
    ("bytes\udcff.nii", "not UTF-8"),
])
def test_only_escapes_controls_and_undecodable_bytes_are_refused(part: str, why: str) -> None:
    import re

    problem = name_problem(part)
    assert problem is not None and re.search(why, problem), problem


@pytest.mark.parametrize("relative", [Path("/etc/passwd.nii.gz"), Path("a/../../x.nii.gz"), Path("..")])
def test_a_name_still_cannot_escape(tmp_path: Path, relative: Path) -> None:
    with pytest.raises(InputError, match="cannot be mapped|path separator"):
        output_path(tmp_path / "out", relative)


def test_a_datalist_case_named_by_an_absolute_path_is_refused_alone(tmp_path: Path) -> None:
    touch(tmp_path / "a.nii.gz")
    (tmp_path / "cases.csv").write_text("case,image\n/etc/evil,a.nii.gz\nPatient 1,a.nii.gz\n")
    found = collect([], (tmp_path / "out").resolve(), datalist=tmp_path / "cases.csv")
    assert [item.output.name for item in found.inputs] == ["Patient 1_seg.nii.gz"]
    assert [r.reason for r in found.refused] == ["its output name /etc/evil holds a path separator"]


def test_a_stale_temp_sweep_of_a_glob_like_name_spares_other_outputs(tmp_path: Path) -> None:
    """A name may now hold * ? [ ]: the merge's sweep of its own stale temps must not match another output's."""
    other = temp_name(tmp_path / "abc_seg.nii.gz")
    other.write_bytes(b"a live writer's temp")
    own = temp_name(tmp_path / "a*[1]_seg.nii.gz")
    own.write_bytes(b"stale")
    assert remove_stale_temps(tmp_path / "a*[1]_seg.nii.gz") == [own]
    assert other.exists() and not own.exists()


# --- items 3 and 11: the filesystem's name limit, counted in bytes on the longest name segq writes ------------

def _stem_limit(directory: Path) -> int:
    """The longest stem whose outputs fit: the probability map's temp name is the longest, 26 bytes over it."""
    return filesystem_limits(directory)[0] - len(temp_name(Path("_prob.nii.gz")).name)


def test_a_name_at_the_limit_is_accepted_and_every_output_can_be_written(tmp_path: Path) -> None:
    out = (tmp_path / "out").resolve()
    stem = "a" * _stem_limit(tmp_path)
    [item] = collect_inputs([touch(tmp_path / "scans" / f"{stem}.nii.gz")], out)
    for path in output_family(item.output):  # what the merge writes, each through its temp name
        with atomic_path(path, durable=False) as tmp:
            tmp.write_bytes(b"x")
        assert path.is_file()


@pytest.mark.parametrize("stem", ["a" * 233, "\u00fc" * 115])  # 240 characters; 122 characters, 237 bytes
def test_a_name_past_the_limit_is_refused_at_submit(tmp_path: Path, stem: str) -> None:
    if len(stem.encode()) <= _stem_limit(tmp_path):
        pytest.skip("this filesystem allows longer names")
    path = touch(tmp_path / "scans" / f"{stem}.nii.gz")
    with pytest.raises(InputError, match=r"is too long: .* bytes in UTF-8, over the 255 bytes per name .*"
                                         r"PC_NAME_MAX\): shorten the name by \d+ bytes? or more") as info:
        collect_inputs([path], (tmp_path / "out").resolve())
    assert str(path) in str(info.value)


def test_the_limit_is_the_output_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eCryptfs allows 143 bytes: a name that fits ext4 is refused there, and the message says the limit."""
    monkeypatch.setattr(os, "pathconf", lambda path, key: 143 if key == "PC_NAME_MAX" else 4096)
    out = tmp_path / "not yet" / "out"
    problem = length_problem(output_family(out / f"{'b' * 120}_seg.nii.gz"), out)
    assert problem is not None and "over the 143 bytes per name" in problem
    assert length_problem(output_family(out / f"{'b' * 117}_seg.nii.gz"), out) is None
    assert "a folder it makes under --out" in (length_problem([out / ("d" * 150) / "x_seg.nii.gz"], out) or "")


def test_every_bad_name_of_a_folder_is_named_at_once(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    bad = ["a\x1b[2J.nii.gz", "b\x07.nii.gz", "c" * 233 + ".nii.gz", "sub\x1b/d.nii.gz"]
    for name in [*bad, "ok.nii.gz", "Patient 002.nii.gz"]:
        touch(scans / name)
    with pytest.raises(InputError) as info:
        collect_inputs([scans], (tmp_path / "out").resolve())
    head, *lines = str(info.value).splitlines()
    assert head.startswith("4 input name(s) cannot be written under") and "nothing was queued" in head
    assert [line.split(": ", 1)[0].strip() for line in lines] == [
        f"{scans}/a\\x1b[2J.nii.gz", f"{scans}/b\\x07.nii.gz", f"{scans}/{'c' * 233}.nii.gz",
        f"{scans}/sub\\x1b/d.nii.gz"]
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)


# --- item 7: the dataset's name ------------------------------------------------------------------------------

def test_a_dataset_name_with_control_characters_is_refused() -> None:
    with pytest.raises(InputError, match=r"holds control characters \(\\x1b\): terminals act on them .*--name") as info:
        check_dataset_name("night\x1b[2J\x1b[31m")
    assert "\x1b" not in str(info.value)
    with pytest.raises(InputError, match="at most 255"):
        check_dataset_name("n" * 256)
    assert check_dataset_name("[link=http://evil.example]night[/link] M\u00fcller").startswith("[link=")


def test_printable_escapes_what_acts_on_a_terminal_and_keeps_the_rest() -> None:
    assert printable("a\x1b[2Jb\x9b31m\u202eevil\udcff\n") == "a\\x1b[2Jb\\x9b31m\\u202eevil\\udcff\\n"
    kept = "Patient 001 M\u00fcller \u60a3\u8005 [red]x[/red] ;$(id)"
    assert printable(kept) == kept and printable(printable("\x1b")) == "\\x1b"


# --- item 7: every place a name is printed ---------------------------------------------------------------------

@pytest.fixture
def hostile_rows(tmp_path: Path) -> Iterator[str]:
    """A dataset named with markup and escapes, one done and one failed job whose names and error hold both:
    rows an older segq stored, or a worker's error quoting a file."""
    url = f"sqlite:///{tmp_path / 'segq.db'}"
    with environment({"SEGQ_DATABASE_URL": url, "SEGQ_DATA_DIR": str(tmp_path / "data")}):
        from segq.db import session_scope, upgrade
        from segq.models import Dataset, Job

        upgrade(url)
        with session_scope() as s:
            ds = Dataset(name=HOSTILE, out_dir="/out", model_path="/m", model_sha256="0" * 64, params={})
            s.add(ds)
            s.flush()
            for i, status in enumerate((Status.DONE, Status.FAILED)):
                s.add(Job(dataset_id=ds.id, input_path=f"/in/{i}{HOSTILE_FILE}.nii.gz", input_sha256="0" * 64,
                          fingerprint=str(i), output_path=f"/out/{i}{HOSTILE_FILE}_seg.nii.gz", status=status,
                          error=f"=cannot read {HOSTILE}, really" if status == Status.FAILED else None,
                          tumour_ml=1.5, workers=["gpu0@[bold]host\x1b[2J"]))
            dataset_id = ds.id
        yield dataset_id


def _assert_shown_as_text(output: str, files: int = 0) -> None:
    """No escape code reached the output, and the markup is visible as typed (``files``: times as a file name)."""
    assert "\x1b" not in output, repr(output)
    assert "[link=http://evil.example]click[/link]" in output, output  # visible, not a live link
    assert output.count("[link=evil.example]click") >= files, output


def _cli(*args: str) -> str:
    from segq.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_status_and_results_table_print_names_and_errors_as_text(hostile_rows: str) -> None:
    status = _cli("status")
    _assert_shown_as_text(status, files=2)
    assert "\\x1b[2J" in status and "gpu0@[bold]host" in status
    table = _cli("results", "--format", "table", "--no-summary")
    _assert_shown_as_text(table, files=2)


def test_results_csv_quotes_names_and_defuses_formulas(hostile_rows: str) -> None:
    from producer.results import rows, to_csv
    from segq import records

    data = rows(records.datasets(hostile_rows))
    parsed = list(csv.DictReader(io.StringIO(to_csv(data))))
    # quoted: commas, quotes and brackets survive a reader; ESC comes back as its escape
    assert [row["input"] for row in parsed] == [printable(row["input"]) for row in data]
    failed = next(row for row in parsed if row["status"] == "failed")
    assert failed["error"] == "'" + printable(str(next(r["error"] for r in data if r["error"])))
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in parsed for cell in row.values())
    cells = list(csv.reader(io.StringIO(to_csv([{**data[0], "error": "-1+2", "volume_error_ml": -0.5,
                                                 "workers": "@SUM(A1)", "backend": "\tcmd", "precision": "\rx"}]))))
    row = dict(zip(cells[0], cells[1], strict=True))
    assert (row["error"], row["volume_error_ml"], row["workers"]) == ("'-1+2", "-0.5", "'@SUM(A1)")
    assert (row["backend"], row["precision"]) == ("'\tcmd", "'\\rx")  # a bare CR would end the row for a reader
    assert "\x1b" not in to_csv(data)  # `segq results --format csv` on a terminal


def test_the_html_report_escapes_names(hostile_rows: str) -> None:
    from producer.report import _cell

    cell = _cell("error", {"error": "<script>alert(1)</script>\x1b[2J"})
    assert cell == "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J"
    assert _cell("input", {"input": "/in/<img src=x onerror=alert(1)>.nii.gz"}) == (
        "&lt;img src=x onerror=alert(1)&gt;.nii.gz")


def test_wait_lines_print_names_as_text(hostile_rows: str) -> None:
    from producer.wait import _jobs, _plain_printer, describe
    from segq import records

    lines = [describe(job) for job in _jobs([job.id for job in records.datasets(hostile_rows)[0].jobs])]
    console = Console(record=True, width=400, force_terminal=True)
    for line in lines:
        _plain_printer(console)(line)
    _assert_shown_as_text(console.export_text(), files=2)
    assert all("\x1b" not in line for line in lines)


def test_watch_prints_the_title_and_workers_as_text() -> None:
    from producer.watch import Snapshot, WorkerRate, render

    snap = Snapshot(total=1, counts={"running": 1}, subtasks_done=0, subtasks_total=1, windows_done=0,
                    windows_remaining=1, windows_per_second=0.0, volumes_per_hour=0.0, eta_seconds=None,
                    workers=[WorkerRate("[link=http://evil.example]click[/link]\x1b[2J", 1, 1, 1.0, 1.0)],
                    loading={"w\x1b[2J": ("torch\x1b[31m", 3.0)})
    console = Console(record=True, width=300)
    console.print(render(snap, f"dataset d '{HOSTILE}'"))
    text = console.export_text()
    _assert_shown_as_text(text)
    assert text.count("[link=http://evil.example]click[/link]") == 2


def test_evaluate_prints_names_and_notes_as_text(hostile_rows: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import producer.evaluate

    def scores(*args: Any, **kwargs: Any) -> list[Any]:
        return [SimpleNamespace(input_path=f"/in/{HOSTILE_FILE}.nii.gz", dice=0.9, volume_error_ml=-0.1,
                                note=f"truth {HOSTILE}.nii.gz")]

    monkeypatch.setattr(producer.evaluate, "evaluate", scores)
    truth = tmp_path / "[bold]truth"
    truth.mkdir()
    output = _cli("evaluate", hostile_rows, "--truth", str(truth))
    _assert_shown_as_text(output, files=1)
    assert "[bold]truth" in output


def test_an_nnunet_case_with_an_escape_in_its_name_is_refused_alone(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    for case in ("bad\x1b[2J", "Patient 7"):
        for channel in range(2):
            touch(scans / f"{case}_{channel:04d}.nii.gz")
    found = collect([scans], (tmp_path / "out").resolve(), in_channels=2)
    assert [item.output.name for item in found.inputs] == ["Patient 7_seg.nii.gz"]
    assert [printable(r.line()) for r in found.refused] == [
        f"case bad\\x1b[2J ({scans}): its output name bad\\x1b[2J holds control characters (\\x1b)"]
