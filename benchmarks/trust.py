"""Class weighting and temperature scaling, measured on whole runs (docs/trust.md).

Trains ``configs/folder_mnv2.py`` on a folder of photos once per ``class_weighting``
(none, balanced) and ``configs/mnist_mnv2.py`` on MNIST, each with ``main.py`` in its own
process, one after the other, and reads each run's ``summary.json``: test accuracy, macro F1,
balanced accuracy, the recall of the two classes rarest in the training split, and the
temperature with the test expected calibration error (15 bins) before and after it.

    python benchmarks/trust.py --photos ../shared/data/clothing-small \\
        --mnist ../shared/data/mnist \\
        --weights ../shared/weights/mobilenet_v2_1.0_imagenet_no_top.h5 --out trust.json

``--mnist_train_examples N`` shortens the MNIST run to its first N training images.
"""

import argparse
import collections
import json
import pathlib
import subprocess
import sys

import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = [("run", "run", "s"), ("accuracy", "test_accuracy", ".4f"),
           ("macro F1", "macro_f1", ".4f"), ("balanced acc", "balanced_accuracy", ".4f"),
           ("rarest 2 recall", "rarest_recall", "s"), ("T", "temperature", ".3f"),
           ("ECE before", "ece_before", ".4f"), ("ECE after", "ece_after", ".4f")]


def train(config: str, workdir: pathlib.Path, overrides: list[str], reuse: bool) -> None:
  """Runs ``main.py`` to the end in ``workdir`` (fresh), unless ``reuse`` and it has."""
  if reuse and (workdir / "summary.json").is_file():
    return
  subprocess.run(["rm", "-rf", str(workdir)], check=True)
  subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / config),
                  "--workdir", str(workdir), *overrides], check=True, cwd=ROOT)


def train_counts(workdir: pathlib.Path) -> collections.Counter:
  """Training images per class, from a folder run's ``splits/train.txt``."""
  lines = (workdir / "splits" / "train.txt").read_text().split()
  return collections.Counter(line.split("/")[-2] for line in lines)


def measured(name: str, workdir: pathlib.Path) -> dict:
  """One row: the run's summary.json figures."""
  summary = json.loads((workdir / "summary.json").read_text())
  report, calibration = summary["classification_report"], summary["calibration"]
  recalls = {c["name"]: c["recall"] for c in report["classes"]}
  row = {"run": name, "test_accuracy": summary["test_accuracy"],
         "macro_f1": report["macro_avg"]["f1"],
         "balanced_accuracy": sum(recalls.values()) / len(recalls),
         "temperature": calibration["temperature"], "ece_before": calibration["test_ece_before"],
         "ece_after": calibration["test_ece_after"], "calibration": calibration,
         "recall": recalls, "rarest_recall": "-"}
  if (workdir / "splits" / "train.txt").is_file():
    rarest = sorted(train_counts(workdir).items(), key=lambda item: item[1])[:2]
    row["rarest"] = {c: {"train_images": n, "recall": recalls[c]} for c, n in rarest}
    row["rarest_recall"] = ", ".join(f"{c} {recalls[c]:.3f}" for c, _ in rarest)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--photos", required=True, help="a folder of photos (clothing-small)")
  parser.add_argument("--mnist", help="MNIST IDX folder (omit: no MNIST run)")
  parser.add_argument("--weights", required=True, help="the ImageNet MobileNetV2 .h5 file")
  parser.add_argument("--mnist_train_examples", type=int, default=0, help="0: all")
  parser.add_argument("--workdir", default="/tmp/tljax_trust", help="runs go under here")
  parser.add_argument("--out", default="trust.json")
  parser.add_argument("--reuse", action="store_true",
                      help="read the runs already finished under --workdir, not train again")
  args = parser.parse_args()
  base = pathlib.Path(args.workdir)
  weights = f"--config.model.weights={args.weights}"
  runs = [(f"photos, class_weighting={mode}", "configs/folder_mnv2.py",
           [f"--config.data.dir={args.photos}", weights, f"--config.class_weighting={mode}"])
          for mode in ("none", "balanced")]
  if args.mnist:
    runs.append(("mnist", "configs/mnist_mnv2.py",
                 [f"--config.data.dir={args.mnist}", weights,
                  f"--config.data.train_examples={args.mnist_train_examples}"]))
  rows = []
  for name, config, overrides in runs:
    workdir = base / name.replace(", ", "_").replace("=", "_")
    train(config, workdir, overrides, args.reuse)
    rows.append(measured(name, workdir))
    timing.write_json(args.out, {"cpu": timing.cpu_model(), "runs": rows})
  print(f"CPU: {timing.cpu_model()}")
  timing.print_table(rows, COLUMNS)


if __name__ == "__main__":
  main()
