"""Timing, tables and JSON shared by the benchmark scripts (standard library only, so that a
worker in an environment without jax can import it)."""

import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

RESULT = "RESULT "  # Prefix of the JSON lines that workers and peer scripts print on stdout.


def time_calls(fn: Callable[[], Any], seconds: float, min_calls: int = 2) -> list[float]:
  """Seconds per call of ``fn``, called for at least ``seconds`` and ``min_calls`` times."""
  times, start = [], time.perf_counter()
  while time.perf_counter() - start < seconds or len(times) < min_calls:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def time_rounds(timers: dict[Any, Callable[[], list[float]]],
                rounds: int) -> dict[Any, list[float]]:
  """Each timer's times over ``rounds`` rounds, the timers taking turns within a round, so that
  their ratios are measured side by side on a possibly busy machine. A timer runs once a round
  and returns its times, e.g. ``functools.partial(time_calls, fn, seconds)``."""
  times = {key: [] for key in timers}
  for r in range(rounds):
    print(f"timing round {r + 1}/{rounds} ...", flush=True)
    for key, timer in timers.items():
      times[key] += timer()
  return times


def summarize(step_times: list[float], batch: int) -> dict[str, float]:
  """Median and p90 in ms, images/s at the median, and the number of samples."""
  median = statistics.median(step_times)
  p90 = statistics.quantiles(step_times, n=10)[-1] if len(step_times) > 1 else median
  return {"median_ms": median * 1e3, "p90_ms": p90 * 1e3, "images_per_s": batch / median,
          "calls": len(step_times)}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
  """``columns``: (header, key, format spec) per column; right-aligned."""
  widths = [max(len(h), *(len(format(r[k], f)) for r in rows)) for h, k, f in columns]
  print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths)))
  for r in rows:
    print("  ".join(format(r[k], f).rjust(w) for (_, k, f), w in zip(columns, widths)))


def _cpu_fields() -> dict[str, str]:
  """``lscpu``'s fields, else the first processor's in ``/proc/cpuinfo``; lower-case keys."""
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    try:
      text = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
      return {}
  return {k.strip().lower(): v.strip() for k, _, v in
          (line.partition(":") for line in text.splitlines())}


def cpu_model() -> str:
  """The host CPU, e.g. ``"AMD EPYC (family 25, model 17), 2 CPUs, AVX-512"``: its name, the
  family and model (the name alone can be vague), and its widest vector extension."""
  fields = _cpu_fields()
  text = fields.get("model name") or platform.processor() or platform.machine()
  if fields.get("cpu family") and fields.get("model"):
    text += f" (family {fields['cpu family']}, model {fields['model']})"
  text += f", {os.cpu_count()} CPUs"
  flags = set(fields.get("flags", "").split())
  isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
  return f"{text}, {isa}" if isa else text


def result_line(record: dict[str, Any]) -> str:
  """``record`` as a line that :func:`find_result` reads back."""
  return RESULT + json.dumps(record)


def find_result(lines: Iterable[str]) -> dict[str, Any] | None:
  """The first ``RESULT {json}`` line of ``lines``, parsed; None if there is none."""
  for line in lines:
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  return None


def write_json(path: str | pathlib.Path, result: dict[str, Any]) -> None:
  """Writes ``result``, indented, and says where."""
  pathlib.Path(path).write_text(json.dumps(result, indent=2))
  print(f"\nwrote {path}")
