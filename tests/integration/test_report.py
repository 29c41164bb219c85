"""`segq report` on a dataset run by real workers, opened in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.helpers import write_nan_volume, write_volume
from tests.integration.test_pipeline import segq

pytestmark = pytest.mark.integration

# Run after the page loaded: count what the browser really decoded, and write it into the DOM it dumps.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.rows = document.querySelectorAll("#results tbody tr").length;
});
</script>"""


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it: apt-get install chromium)")
    return binary


def browse(page: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with nothing reaching out: no sync, no updates, no background traffic."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", *flags, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_loads_in_chromium_with_table_plots_and_images(fresh_stack: Stack, unet_model: Path,
                                                               tmp_path: Path) -> None:
    stack = fresh_stack
    stack.worker("w1")
    scans = tmp_path / "scans"
    for i in range(2):
        write_volume(scans / f"case{i}.nii.gz", (40, 36, 30), seed=i)
    write_nan_volume(scans / "broken.nii.gz")
    segq("submit", str(scans), "--out", str(tmp_path / "masks"), "--model", str(unet_model), "--name", "reported",
         "--wait", "--timeout", "240", env=stack.env, check=False)
    report = tmp_path / "report.html"
    written = segq("report", "reported", "-o", str(report), env=stack.env)
    assert str(report) in written.stdout
    busy = re.search(r"w1@\S+: busy (\d+\.\d)% of (\d+\.\d) s, (\d+) part\(s\)", written.stdout)
    assert busy is not None, written.stdout
    assert 0 < float(busy.group(1)) <= 100 and int(busy.group(3)) >= 2, "each done volume's part ran on w1"

    page = report.read_text()
    assert not re.search(r'(href|src)="(https?:)?//', page), "the page must be self-contained"
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dumped = browse(probe, tmp_path, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    dom = dumped.stdout
    assert '<table id="results">' in dom and "segq report: reported" in dom and '<table id="busy">' in dom
    assert "NaN or infinite" in dom and "case0.nii.gz" in dom and "case1.nii.gz" in dom
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:2000]
    attributes = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    # three plots, the timeline, and one mid-slice per done volume; every one decoded by the browser
    assert attributes == {"images": "6", "decoded": "6", "rows": "3"}, body.group(0)

    shot = tmp_path / "report.png"
    shotted = browse(report, tmp_path, f"--screenshot={shot}", "--window-size=1280,1800", "--hide-scrollbars")
    assert shotted.returncode == 0 and shot.is_file(), shotted.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
