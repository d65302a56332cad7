"""tljax.report: report.html from a finished run (conftest's tiny_idx_run) and a hand-written
data audit, its content, and the page in headless Chromium: every image loads, the console
stays silent, and a screenshot is taken."""

import html
import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import unavailable
from tljax import report

CHROMIUM = pathlib.Path("/usr/bin/chromium")
FIGURES = ("curves.png", "confusion_matrix.png", "top_losses.png", "reliability.png",
           "samples.png")
AUDIT = {
    "exact_duplicates": [{"paths": ["train/3/a.png", "test/3/a.png"]}],
    "near_duplicates": [{"paths": ["train/1/b.png", "validation/1/c.png"], "similarity": 0.981}],
    "suspected_label_errors": [
        {"path": "train/7/<odd> & name.png", "label": "7", "suggested": "1", "score": 0.93},
        {"path": "train/2/d.png", "label": "2", "suggested": "5", "score": 0.61}],
    "class_counts": {"train": {"0": 13, "1": 12}, "validation": {"0": 3, "1": 4},
                     "test": {"0": 4, "1": 4}},
}
# Appended to a copy of the page: on load, a <pre id="result"> lists each image and whether
# it decoded.
CHECK = """<script>
window.addEventListener("load", () => {
  const result = document.createElement("pre");
  result.id = "result";
  result.textContent = JSON.stringify([...document.images].map(
      image => [image.getAttribute("src"), image.complete && image.naturalWidth > 0]));
  document.body.appendChild(result);
});
</script></body>"""


@pytest.fixture(scope="module")
def reported(tiny_idx_run, tmp_path_factory):
  """A copy of the finished run's outputs with an audit beside them, and its report."""
  workdir = tmp_path_factory.mktemp("reported")
  source = tiny_idx_run[0]
  for name in ("summary.json", *FIGURES):
    shutil.copy(source / name, workdir / name)
  (workdir / "export").mkdir()
  shutil.copy(source / "export" / "model.json", workdir / "export" / "model.json")
  (workdir / "audit.json").write_text(json.dumps(AUDIT))
  Image.fromarray(np.full((60, 120, 3), 200, np.uint8)).save(workdir / "audit_gallery.png")
  assert report.main(["--workdir", str(workdir)]) == 0
  return workdir, (workdir / "report.html").read_text()


def test_a_run_ends_with_its_report(tiny_idx_run):
  page = (tiny_idx_run[0] / "report.html").read_text()
  audit = json.loads((tiny_idx_run[0] / "audit.json").read_text())
  flat = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))
  assert page.startswith("<!DOCTYPE html>") and "No data audit" not in page
  assert f"exact duplicate groups {len(audit['exact_duplicates'])}" in flat


def test_the_page_shows_the_runs_numbers_and_the_audit(reported):
  workdir, page = reported
  summary = json.loads((workdir / "summary.json").read_text())
  text = html.unescape(re.sub(r"<[^>]+>", " ", page))
  assert f"{100 * summary['test_accuracy']:.2f}%" in text
  assert f"{summary['calibration']['temperature']:.4f}" in text
  assert f"{summary['calibration']['test_ece_after']:.4f}" in text
  for row in summary["classification_report"]["classes"]:
    assert f" {row['name']} {row['precision']:.4f} {row['recall']:.4f} {row['f1']:.4f} " \
        f"{row['support']} " in re.sub(r"\s+", " ", text)
  assert "model.jax_exported" in text
  flat = re.sub(r"\s+", " ", text)
  assert "exact duplicate groups 1" in flat and "near-duplicate pairs 1" in flat
  assert "suspected label errors 2" in flat
  assert "train/7/<odd> & name.png 7 1 0.9300" in flat  # Escaped in the page, shown as is.
  assert "&lt;odd&gt; &amp; name" in page
  sources = re.findall(r'<img src="([^"]+)"', page)
  assert sorted(sources) == sorted([*FIGURES, "audit_gallery.png"])


def test_a_directory_without_a_run_is_one_message(tmp_path, caplog):
  assert report.main(["--workdir", str(tmp_path)]) == 2
  assert "holds no finished run (no readable summary.json)" in caplog.text


def _chromium() -> pathlib.Path:
  if not CHROMIUM.is_file():
    unavailable(f"{CHROMIUM} is absent: apt-get install chromium to test the page in a browser.",
                f"{CHROMIUM} is missing; CI installs Debian's chromium (.ci/run).")
  return CHROMIUM


def test_the_page_loads_in_headless_chromium_with_every_image_and_no_console_message(
    reported, tmp_path):
  workdir, page = reported
  check = workdir / "report_check.html"
  check.write_text(page.replace("</body>", CHECK))
  screenshot = tmp_path / "report.png"
  done = subprocess.run(
      [str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
       "--no-first-run", "--disable-background-networking", "--disable-component-update",
       "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
       "--v=0", "--window-size=1200,4000", f"--screenshot={screenshot}", "--dump-dom",
       check.as_uri()], capture_output=True, text=True, timeout=120)
  result = re.search(r'<pre id="result">(.*?)</pre>', done.stdout)
  assert result, done.stderr[-2000:]
  images = json.loads(html.unescape(result.group(1)))
  assert sorted(src for src, _ in images) == sorted([*FIGURES, "audit_gallery.png"])
  assert all(loaded for _, loaded in images), images
  assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []
  shot = np.asarray(Image.open(screenshot).convert("L"))
  assert shot.shape == (4000, 1200) and shot.std() > 10  # Not a blank page.
