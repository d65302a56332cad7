"""The benchmarks' shared helpers (benchmarks/timing.py) and compare_builds.py's reading of a
run's JSON, which import no jax."""

import importlib.util
import pathlib
import sys

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "timing", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py")
timing = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(timing)
sys.modules.setdefault("timing", timing)  # compare_builds.py imports it by that name.
_SPEC = importlib.util.spec_from_file_location(
    "compare_builds", pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    / "compare_builds.py")
compare_builds = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_builds)


def test_time_calls_calls_at_least_min_calls():
  calls = []
  times = timing.time_calls(lambda: calls.append(1), seconds=0.0, min_calls=3)
  assert len(times) == len(calls) == 3
  assert all(t >= 0 for t in times)


def test_summarize_reports_median_p90_and_images_per_second():
  stats = timing.summarize([0.01, 0.02, 0.03], batch=32)
  assert stats["median_ms"] == pytest.approx(20.0)
  assert stats["images_per_s"] == pytest.approx(1600.0)
  assert stats["p90_ms"] >= stats["median_ms"]
  assert stats["calls"] == 3


def test_print_table_right_aligns_formatted_columns(capsys):
  timing.print_table([{"name": "a", "ms": 1.234}, {"name": "long", "ms": 10.0}],
                     [("case", "name", ""), ("ms", "ms", ".1f")])
  assert capsys.readouterr().out.splitlines() == ["case    ms", "   a   1.2", "long  10.0"]


def test_result_lines_round_trip_among_other_output():
  lines = ["Epoch 1/1\n", timing.result_line({"test_acc": 0.85}) + "\n"]
  assert timing.find_result(lines) == {"test_acc": 0.85}
  assert timing.find_result(["no result\n"]) is None


def test_cpu_model_names_the_cpu():
  assert timing.cpu_model().strip()


def test_compare_builds_reads_dotted_metrics_of_each_row():
  result = {"runs": [{"run": "tljax", "wall_s": 9.5,
                      "summary": {"phases": [{"wall_s": 1.0}, {"wall_s": 7.0}]}},
                     {"run": "peer", "wall_s": 30.0, "summary": None}]}
  assert compare_builds.metrics(result, "runs", "run", "wall_s") == {"tljax": 9.5, "peer": 30.0}
  assert compare_builds.metrics(result, "runs", "run", "wall_s,summary.phases.1.wall_s") == {
      "tljax wall_s": 9.5, "tljax summary.phases.1.wall_s": 7.0, "peer wall_s": 30.0}
  assert compare_builds.metrics(None, "runs", "run", "wall_s") == {}
