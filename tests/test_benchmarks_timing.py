"""The benchmarks' shared helpers (benchmarks/timing.py), which import no jax."""

import importlib.util
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "timing", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py")
timing = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(timing)


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
