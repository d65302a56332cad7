"""A whole recipe end to end: tljax's ``main.py``, then its tf.keras peer, on this machine.

    python benchmarks/recipe.py --tf_python /path/tfvenv/bin/python
    python benchmarks/recipe.py --recipe folder --tf_python /path/tfvenv/bin/python
    python benchmarks/recipe.py --skip_peer --config.phases[0].epochs=1

``mnist`` runs ``configs/mnist_mnv2.py`` against the tutorial's script in tf.keras
(``peers/seed_keras.py DATA WEIGHTS --tf``); ``folder`` runs ``configs/folder_mnv2.py``
against the TensorFlow tutorial's photo recipe (``peers/folder_keras.py ROOT WEIGHTS --size
160``). The two run one after the other, never together, each as its own process: its wall
time runs from process start to exit (imports, data loading, compiling and evaluating
included). Test accuracy comes from tljax's ``summary.json`` and the peer's ``RESULT`` line.
Arguments ``--config.KEY=VALUE`` pass through to ``main.py``, ``--peer_args="..."`` to the
peer (e.g. ``--peer_args="--epochs1 1 --epochs2 1"``). Prints a table and writes JSON.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

from timing import cpu_model, find_result, print_table, write_json

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = "weights/mobilenet_v2_1.0_imagenet_no_top.h5"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A tljax config and the peer script that runs the same recipe in tf.keras."""
  config: str                   # Relative to the repository.
  data: str                     # Default data, relative to --shared.
  peer: str                     # Script in --shared/peers, run as ``peer DATA WEIGHTS ...``.
  peer_args: tuple[str, ...]    # Its arguments after DATA and WEIGHTS.


RECIPES = {
    "mnist": Recipe("configs/mnist_mnv2.py", "data/mnist", "seed_keras.py", ("--tf",)),
    "folder": Recipe("configs/folder_mnv2.py", "data/clothing-small", "folder_keras.py",
                     ("--size", "160")),
}


def run_timed(name: str, command: list[str], env: dict[str, str]) -> dict[str, Any]:
  """Runs ``command``, echoing its output; its wall time, exit status and output lines."""
  print(f"=== {name}: {shlex.join(command)}", flush=True)
  lines = []
  start = time.perf_counter()
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        env=env, cwd=REPO) as proc:
    for line in proc.stdout:
      print(line, end="", flush=True)
      lines.append(line)
  wall_s = time.perf_counter() - start
  print(f"=== {name}: exit status {proc.returncode}, {wall_s:.1f} s", flush=True)
  return {"wall_s": wall_s, "status": proc.returncode, "lines": lines}


def run_tljax(args) -> dict[str, Any]:
  """``main.py`` in a fresh work directory; the run's summary.json beside its wall time."""
  with tempfile.TemporaryDirectory(prefix="tljax_recipe_") as workdir:
    command = [sys.executable, "main.py", "--config", args.config, "--workdir", workdir,
               f"--config.data.dir={args.data}", f"--config.model.weights={args.weights}",
               *args.overrides]
    run = run_timed("tljax", command, dict(os.environ))
    summary_path = pathlib.Path(workdir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
  return {"run": "tljax", "command": shlex.join(command), "wall_s": run["wall_s"],
          "status": run["status"],
          "test_accuracy": summary["test_accuracy"] if summary else None, "summary": summary}


def run_peer(args) -> dict[str, Any]:
  """The recipe's tf.keras peer with ``--tf_python``; its RESULT line beside its wall time."""
  recipe = RECIPES[args.recipe]
  command = [args.tf_python, str(args.shared / "peers" / recipe.peer), args.data, args.weights,
             *recipe.peer_args, *shlex.split(args.peer_args)]
  # With Keras 3 installed, tf.keras is Keras 3 too, on the backend this variable names.
  env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
  run = run_timed("tf.keras", command, env)
  result = find_result(run["lines"])
  return {"run": "tf.keras", "command": shlex.join(command), "wall_s": run["wall_s"],
          "status": run["status"],
          "test_accuracy": result["test_acc"] if result else None, "result": result}


def report(runs: list[dict[str, Any]], cpu: str) -> float | None:
  """Prints the table; returns the peer's wall time over tljax's (None without both)."""
  rows = [{"run": r["run"], "wall": f"{r['wall_s']:.1f}", "status": str(r["status"]),
           "accuracy": "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2%}"}
          for r in runs]
  print(f"\nhost CPU: {cpu}")
  print_table(rows, [("run", "run", ""), ("wall s", "wall", ""),
                     ("test accuracy", "accuracy", ""), ("exit status", "status", "")])
  if len(runs) < 2 or any(r["status"] != 0 for r in runs):
    return None
  ratio = runs[1]["wall_s"] / runs[0]["wall_s"]
  print(f"tf.keras's wall time over tljax's: {ratio:.1f}x")
  return ratio


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--recipe", choices=RECIPES, default="mnist")
  parser.add_argument("--config", help="tljax config file; default: the recipe's")
  parser.add_argument("--shared", type=pathlib.Path, default=SHARED,
                      help="folder holding peers/, data/ and weights/")
  parser.add_argument("--data", help="dataset folder for both runs; default: the recipe's")
  parser.add_argument("--weights", help=f"Keras MobileNetV2 .h5; default: --shared/{WEIGHTS}")
  parser.add_argument("--tf_python", default=sys.executable,
                      help="Python interpreter that can import tensorflow, for the peer")
  parser.add_argument("--peer_args", default="",
                      help='more arguments for the peer script, e.g. "--epochs1 1 --epochs2 1"')
  parser.add_argument("--skip_peer", action="store_true", help="run tljax only")
  parser.add_argument("--out", help="JSON output; default: recipe_<recipe>.json")
  args, overrides = parser.parse_known_args()
  unknown = [a for a in overrides if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.KEY=VALUE "
                 "overrides pass through to main.py)")
  recipe = RECIPES[args.recipe]
  args.overrides = overrides
  args.config = str(pathlib.Path(args.config).resolve()) if args.config else \
      str(REPO / recipe.config)
  args.data = str(pathlib.Path(args.data or args.shared / recipe.data).resolve())
  args.weights = str(pathlib.Path(args.weights or args.shared / WEIGHTS).resolve())
  args.out = args.out or f"recipe_{args.recipe}.json"
  return args


def main():
  args = parse_args()
  cpu = cpu_model()
  runs = [run_tljax(args)]
  if runs[0]["status"] != 0:
    print("tljax failed: the peer is not run.")
  elif not args.skip_peer:
    runs.append(run_peer(args))
  ratio = report(runs, cpu)
  write_json(args.out, {"recipe": args.recipe, "date": time.strftime("%Y-%m-%d"), "cpu": cpu,
                        "overrides": args.overrides, "peer_args": args.peer_args,
                        "peer_over_tljax_wall": ratio, "runs": runs})
  sys.exit(1 if any(r["status"] != 0 for r in runs) else 0)


if __name__ == "__main__":
  main()
