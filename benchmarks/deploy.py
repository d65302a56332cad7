"""The exported files of finished runs side by side: size, test accuracy, agreement with JAX,
latency and throughput on this CPU, each runtime with its default threads and with 2.

    python benchmarks/deploy.py --workdir runs/photos --workdir runs/mnist --out deploy.json

For each run (its ``export/`` written by the run or by ``python -m tljax.export``): the JAX
model (the run's own inference function, jitted) and ``model.onnx``, ``model.int8.onnx``
(onnxruntime), ``model.tflite``, ``model.int8.tflite`` (LiteRT, XNNPACK). Accuracy and
agreement on the run's test split; latency the median of ``--calls`` calls on one image;
throughput the images per second of batches of 32 (median over ``--seconds``). Then each int8
file against its float32 file at batch 1, side by side: ``--rounds`` rounds, the two files
taking turns within a round (``--calls`` calls each), and the median round's time ratio.
Prints two tables and writes JSON.
"""

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # This checkout's tljax.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from timing import cpu_model, print_table, time_calls, time_rounds, write_json  # noqa: E402
from tljax import export, predict  # noqa: E402
from tljax.data import load  # noqa: E402
from tljax.export import runtimes  # noqa: E402

FILES = ("model.jax_exported", "model.onnx", "model.int8.onnx", "model.tflite",
         "model.int8.tflite")


def jax_runner(run, threads: int | None):
  """The run's inference function, jitted; XLA's CPU threads are set per process, so JAX is
  measured with its default only."""
  if threads:
    return None
  function = jax.jit(export.inference_function(run.model, run.variables, run.view))
  return lambda images: np.asarray(function(images))


def measure(runner, images: np.ndarray, calls: int, seconds: float) -> dict[str, float]:
  one, batch = images[:1], images[:32]
  runner(one)
  runner(batch)  # Compile, allocate, warm up.
  latency = [time_calls(lambda: runner(one), 0, 1)[0] for _ in range(calls)]
  batches = time_calls(lambda: runner(batch), seconds, 3)
  return {"latency_ms": 1e3 * statistics.median(latency),
          "images_per_s": len(batch) / statistics.median(batches)}


def exported_file(workdir: pathlib.Path, name: str) -> pathlib.Path | None:
  """``<workdir>/export/<name>``, or its ``FAILED_GATE`` name (measured all the same); None
  where neither exists."""
  path = workdir / "export" / name
  for candidate in (path, export.gate.failed_name(path)):
    if candidate.is_file():
      return candidate
  print(f"{path}: missing, skipped")
  return None


def int8_speedups(workdir: pathlib.Path, image: np.ndarray, calls: int,
                  rounds: int) -> list[dict]:
  """Each int8 file against its float32 file on ``image``, per runtime thread setting: the
  median of ``rounds`` rounds' float32-over-int8 time ratios (each round's times the median
  of ``calls`` calls per file, the files taking turns), and the lowest and highest."""
  rows = []
  for fmt in ("onnx", "tflite"):
    paths = {precision: exported_file(workdir, export.deploy.FILES[fmt, precision])
             for precision in ("float32", "int8")}
    if None in paths.values():
      continue
    for threads in (None, 2):
      runners = {precision: runtimes.runner(path, threads) for precision, path in paths.items()}
      times = time_rounds({precision: functools.partial(time_calls, functools.partial(
          runner, image), 0, calls) for precision, runner in runners.items()}, rounds)
      medians = {precision: np.median(np.reshape(t, (rounds, calls)), axis=1)
                 for precision, t in times.items()}  # Each round's.
      ratios = sorted(medians["float32"] / medians["int8"])
      rows.append({"run": workdir.name, "format": fmt, "threads": threads or "default",
                   "float32_ms": 1e3 * float(np.median(medians["float32"])),
                   "int8_ms": 1e3 * float(np.median(medians["int8"])),
                   "speedup": float(np.median(ratios)), "speedup_min": float(ratios[0]),
                   "speedup_max": float(ratios[-1])})
  return rows


def bench_run(workdir: pathlib.Path, calls: int, seconds: float,
              rounds: int) -> tuple[list[dict], list[dict]]:
  """The run's rows of the files table, and its rows of the int8 speed-up table."""
  run = predict.load_run(workdir)
  _, splits = load.load_splits(run.config, workdir)
  test = splits["test"]
  images = np.asarray(test.images[np.arange(len(test))])
  reference = export.deploy.reference_probabilities(run.model, run.variables, run.view, images)
  rows = []
  for name in FILES:
    path = exported_file(workdir, name)
    if path is None:
      continue
    for threads in (None, 2):
      runner = (jax_runner(run, threads) if name == "model.jax_exported"
                else runtimes.runner(path, threads))
      if runner is None:
        continue
      probabilities = (reference if name == "model.jax_exported"
                       else runtimes.in_batches(runner, images))
      print(f"timing {workdir.name} {name} threads={threads or 'default'} ...", flush=True)
      rows.append({"run": workdir.name, "dataset": run.config.data.name, "file": path.name,
                   "threads": threads or "default", "mb": path.stat().st_size / 1e6,
                   **export.gate.measure(probabilities, export.gate.TestSet(
                       images, test.labels, reference)),
                   **measure(runner, images, calls, seconds)})
  print(f"timing {workdir.name}: int8 against float32 at batch 1, {rounds} rounds ...", flush=True)
  return rows, int8_speedups(workdir, images[:1], calls, rounds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", action="append", required=True, type=pathlib.Path,
                      help="a finished run's work directory (repeatable)")
  parser.add_argument("--calls", type=int, default=100, help="one-image calls timed")
  parser.add_argument("--seconds", type=float, default=3.0, help="batch-32 timing per row")
  parser.add_argument("--rounds", type=int, default=5,
                      help="rounds of the int8-against-float32 comparison at batch 1")
  parser.add_argument("--out", default="deploy.json")
  args = parser.parse_args()
  results = [bench_run(workdir, args.calls, args.seconds, args.rounds)
             for workdir in args.workdir]
  rows = [row for run_rows, _ in results for row in run_rows]
  speedups = [row for _, run_speedups in results for row in run_speedups]
  for row in rows:
    row["accuracy_pct"] = 100 * row["test_accuracy"]
    row["agreement_pct"] = 100 * row["top1_agreement"]
  cpu = cpu_model()
  print(f"\n{cpu}; onnxruntime {runtimes.versions().get('onnxruntime')}, ai-edge-litert "
        f"{runtimes.versions().get('ai-edge-litert')}, jax {jax.__version__}")
  print_table(rows, [("run", "run", ""), ("file", "file", ""), ("threads", "threads", ""),
                     ("MB", "mb", ".2f"), ("accuracy %", "accuracy_pct", ".2f"),
                     ("agree %", "agreement_pct", ".2f"), ("max |diff|", "max_abs_difference", ".1e"),
                     ("1 image ms", "latency_ms", ".2f"), ("batch 32 img/s", "images_per_s", ".0f")])
  print(f"\nint8 against float32 at batch 1, {args.rounds} rounds of {args.calls} calls each, "
        "taking turns (speed-up: the median round's, lowest, highest)")
  print_table(speedups, [("run", "run", ""), ("format", "format", ""), ("threads", "threads", ""),
                         ("float32 ms", "float32_ms", ".3f"), ("int8 ms", "int8_ms", ".3f"),
                         ("speed-up", "speedup", ".2f"), ("lowest", "speedup_min", ".2f"),
                         ("highest", "speedup_max", ".2f")])
  write_json(args.out, {"cpu": cpu, "cpus": os.cpu_count(), "versions": runtimes.versions(),
                        "jax_version": jax.__version__, "calls": args.calls,
                        "rounds": args.rounds, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "rows": rows, "int8_speedups": speedups})


if __name__ == "__main__":
  main()
