"""One benchmark in two checkouts of tljax, alternating: is a change slower?

    git worktree add /tmp/before <commit>
    python benchmarks/compare_builds.py --before /tmp/before --rounds 2 \\
        --rows runs --label run --metric wall_s,summary.phases.1.wall_s -- \\
        python benchmarks/recipe.py --skip_peer --out {out}

Runs the command after ``--`` in the ``--before`` checkout and in ``--after`` (default: this
one), each as its own process with its working directory and ``PYTHONPATH`` at that
checkout, alternately (before, after; then after, before; ...) so that drift of a shared
machine falls on both alike. ``{out}`` in the command becomes a fresh JSON path per run; the
rows under ``--rows`` of that JSON, named by ``--label``, give ``--metric`` per build. Prints
the medians and the after/before ratio per row, with each run's wall time, and writes JSON.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from timing import cpu_model, print_table, write_json

REPO = pathlib.Path(__file__).resolve().parents[1]
BUILDS = ("before", "after")


def run_once(command: list[str], checkout: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
  """Runs ``command`` in ``checkout``; returns its wall time, exit code and JSON (if any)."""
  env = {**os.environ, "PYTHONPATH": str(checkout)}
  started = time.perf_counter()
  done = subprocess.run([part.replace("{out}", str(out)) for part in command], cwd=checkout,
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall_s = time.perf_counter() - started
  if done.returncode:
    print(f"{checkout}: exit {done.returncode}\n{done.stderr[-3000:]}", file=sys.stderr)
  result = json.loads(out.read_text()) if out.is_file() else None
  return {"wall_s": wall_s, "status": done.returncode, "json": result}


def _field(row: dict[str, Any], path: str):
  """``row``'s value at a dotted ``path`` (``summary.phases.1.wall_s``), None where absent."""
  value: Any = row
  for key in path.split("."):
    if isinstance(value, list) and key.isdigit() and int(key) < len(value):
      value = value[int(key)]
    elif isinstance(value, dict) and key in value:
      value = value[key]
    else:
      return None
  return value


def metrics(result: dict[str, Any] | None, rows: str, label: str, metric: str) -> dict:
  """``{row label [metric]: value}`` of one run's JSON (empty without ``--rows``); ``metric``
  is one or more dotted paths, comma-separated (the metric is named where there are several)."""
  if result is None or not rows:
    return {}
  labels = [part.strip() for part in label.split(",")]
  paths = [part.strip() for part in metric.split(",")]
  values = {}
  for row in result[rows]:
    name = " ".join(str(row[key]) for key in labels)
    for path in paths:
      value = _field(row, path)
      if value is not None:
        values[f"{name} {path}" if len(paths) > 1 else name] = value
  return values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--before", type=pathlib.Path, required=True, help="checkout before")
  parser.add_argument("--after", type=pathlib.Path, default=REPO, help="checkout after")
  parser.add_argument("--rounds", type=int, default=2, help="runs of each build")
  parser.add_argument("--rows", default="", help="key of the list of rows in the JSON")
  parser.add_argument("--label", default="label", help="row field(s) naming a row, a,b")
  parser.add_argument("--metric", default="median_ms",
                      help="row field(s) to compare: dotted paths, a,b")
  parser.add_argument("--out", default="compare_builds.json")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --")
  checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for round_ in range(args.rounds):
      for build in (BUILDS if round_ % 2 == 0 else BUILDS[::-1]):
        out = pathlib.Path(tmp) / f"{build}_{round_}.json"
        run = run_once(command, checkouts[build], out)
        values = metrics(run.pop("json"), args.rows, args.label, args.metric)
        runs.append({"build": build, "round": round_, **run, "metrics": values})
        print(f"round {round_ + 1} {build}: {run['wall_s']:.1f} s, exit {run['status']}",
              flush=True)
  rows = []
  names = ["wall_s (whole command)"] + list(dict.fromkeys(
      name for run in runs for name in run["metrics"]))
  for name in names:
    medians = {}
    for build in BUILDS:
      values = [run["wall_s"] if name.startswith("wall_s (") else run["metrics"].get(name)
                for run in runs if run["build"] == build]
      values = [v for v in values if v is not None]
      medians[build] = statistics.median(values) if values else float("nan")
    ratio = medians["after"] / medians["before"] if medians["before"] else float("nan")
    rows.append({"row": name, **medians, "after_over_before": ratio})
  cpu = cpu_model()
  print(f"\n{args.metric} per row, medians of {args.rounds} alternating runs each; CPU: {cpu}")
  print_table(rows, [("row", "row", ""), ("before", "before", ".2f"), ("after", "after", ".2f"),
                     ("after/before", "after_over_before", ".3f")])
  write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "command": command,
                        "checkouts": {k: str(v) for k, v in checkouts.items()},
                        "metric": args.metric, "rows": rows, "runs": runs})


if __name__ == "__main__":
  main()
