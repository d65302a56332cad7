"""The data audit (tljax/audit/) on clothing-small: as shipped, inside a whole run, and on a
copy with planted leaks and label flips.

    python benchmarks/audit.py [--shared ../shared] [--skip_run] [--out audit.json]

1. ``configs/folder_mnv2.py`` on clothing-small as shipped, the whole run: the audit's
   findings, its wall time and its fraction of the run's (``summary.json``).
2. A copy in a temp dir with some test photos copied into train (as they are, and cropped,
   resized and re-encoded as JPEG) and some train photos moved to a wrong class; the audit
   alone, its near-duplicate threshold lowered to ``--low_threshold`` so that the similarity
   of every planted copy and of the most similar distinct photos is seen: how many of each
   plant it finds at the configured threshold, and where the moved photos rank.
Prints tables and writes JSON; the workdirs are kept under ``--keep`` where given.
"""

import argparse
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time

from PIL import Image

from timing import cpu_model, print_table, write_json

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WEIGHTS = "weights/mobilenet_v2_1.0_imagenet_no_top.h5"


def _config(root: pathlib.Path, weights: pathlib.Path, **audit):
  from configs import folder_mnv2
  config = folder_mnv2.get_config()
  config.data.dir, config.model.weights = str(root), str(weights)
  config.audit.update(audit)
  return config


def whole_run(root: pathlib.Path, weights: pathlib.Path, workdir: pathlib.Path) -> dict:
  """The folder recipe with its audit: the audit's summary, its wall time and the run's."""
  from tljax import train
  started = time.perf_counter()
  summary = train.run(_config(root, weights), workdir)
  run_s = time.perf_counter() - started
  audited = summary["audit"]
  return {**{k: audited[k] for k in ("exact_duplicate_groups", "near_duplicate_pairs",
                                     "suspected_label_errors", "test_copies_in_train")},
          "audit_s": audited["wall_s"], "audit_features_s": audited["features_s"],
          **{f"{p['name']}_phase_s": p["wall_s"] for p in summary["phases"]}, "run_s": run_s,
          "audit_fraction": audited["wall_s"] / run_s, "test_accuracy": summary["test_accuracy"]}


def plant(source: pathlib.Path, root: pathlib.Path, *, exact: int, altered: int, moved: int,
          seed: int = 0) -> dict:
  """Copies ``source`` to ``root`` and plants in it: ``exact`` test photos copied into train
  as they are, ``altered`` cropped by 5% a side, resized to 80% and saved as JPEG quality 75,
  ``moved`` train photos moved to another class. Returns the planted paths."""
  shutil.copytree(source, root)
  rng = random.Random(seed)
  classes = sorted(p.name for p in (root / "train").iterdir())
  tests = rng.sample(sorted((root / "test").glob("*/*")), exact + altered)
  planted = {"exact": [], "altered": [], "moved": []}
  for i, photo in enumerate(tests):
    kind = "exact" if i < exact else "altered"
    target = root / "train" / photo.parent.name / f"planted_{kind}_{photo.stem}.jpg"
    if kind == "exact":
      shutil.copyfile(photo, target.with_suffix(photo.suffix))
      target = target.with_suffix(photo.suffix)
    else:
      with Image.open(photo) as image:
        w, h = image.size
        image = image.convert("RGB").crop((w // 20, h // 20, w - w // 20, h - h // 20))
        image.resize((int(w * 0.8), int(h * 0.8))).save(target, quality=75)
    planted[kind].append([str(photo.relative_to(root)), str(target.relative_to(root))])
  for photo in rng.sample(sorted((root / "train").glob("*/*")), moved):
    if photo.name.startswith("planted_"):
      continue
    wrong = rng.choice([c for c in classes if c != photo.parent.name])
    target = root / "train" / wrong / photo.name
    photo.rename(target)
    planted["moved"].append(str(target.relative_to(root)))
  return planted


def audit_alone(config, workdir: pathlib.Path) -> tuple[dict, dict]:
  """The audit of ``config``'s data as a run makes it: its summary and audit.json."""
  from tljax import audit, models, sharding
  from tljax.data import load, transforms
  mesh = sharding.data_mesh()
  dataset, splits = load.load_splits(config, workdir)
  model = models.create(config.model, dataset.num_classes, mesh.shape[sharding.DATA_AXIS])
  _, summary = audit.audit_splits(config, workdir, dataset, splits, model,
                                  transforms.EvalView.from_config(config), mesh)
  return summary, json.loads((workdir / "audit.json").read_text())


def planted_findings(record: dict, planted: dict, threshold: float) -> dict:
  """How many plants the audit finds at ``threshold``, and where the moved photos rank."""
  exact = {frozenset(group["paths"]) for group in record["exact_duplicates"]}
  near = {frozenset(p["paths"]): p["similarity"] for p in record["near_duplicates"]}
  altered = [near.get(frozenset(pair), 0.0) for pair in planted["altered"]]
  distinct = [s for pair, s in near.items() if not any(
      frozenset(p) == pair for p in planted["altered"])]
  ranks = {s["path"]: r + 1 for r, s in enumerate(record["suspected_label_errors"])}
  moved_ranks = sorted(ranks.get(path, 0) for path in planted["moved"])
  return {"exact_found": sum(frozenset(p) in exact for p in planted["exact"]),
          "exact_planted": len(planted["exact"]),
          "altered_found": sum(s > threshold for s in altered),
          "altered_planted": len(altered), "altered_similarities": sorted(altered),
          "distinct_top_similarities": sorted(distinct, reverse=True)[:10],
          "moved_found": sum(r > 0 for r in moved_ranks), "moved_planted": len(moved_ranks),
          "moved_ranks": moved_ranks, "suspects": len(record["suspected_label_errors"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=REPO.parent / "shared")
  parser.add_argument("--skip_run", action="store_true", help="Only the planted copy.")
  parser.add_argument("--low_threshold", type=float, default=0.8)
  parser.add_argument("--keep", type=pathlib.Path, default=None, help="Keep the workdirs here.")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("audit_benchmark.json"))
  args = parser.parse_args()
  from tljax import reporting
  reporting.setup_logging()  # Before any library logs, so that the run's INFO lines show.
  source, weights = args.shared / "data" / "clothing-small", args.shared / WEIGHTS
  keep = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="tljax_audit_"))
  results = {"cpu": cpu_model()}
  if not args.skip_run:
    results["shipped"] = whole_run(source, weights, keep / "shipped")
    print_table([results["shipped"]], [(k, k, ".3f" if "_s" in k or "fraction" in k or
                                        "accuracy" in k else "d")
                                       for k in results["shipped"]])
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "clothing-planted"
    planted = plant(source, root, exact=10, altered=10, moved=20)
    config = _config(root, weights, near_duplicate_threshold=args.low_threshold,
                     max_listed=100000)
    config.data.cache_dir = str(pathlib.Path(tmp) / "cache")
    summary, record = audit_alone(config, keep / "planted")
  threshold = _config(root, weights).audit.near_duplicate_threshold
  results["planted"] = {**planted_findings(record, planted, threshold),
                        "audit_s": summary["wall_s"], "audit_features_s": summary["features_s"],
                        "threshold": threshold}
  print_table([results["planted"]], [(k, k, "d") for k in (
      "exact_found", "exact_planted", "altered_found", "altered_planted", "moved_found",
      "moved_planted", "suspects")])
  print("altered copies' similarity:", results["planted"]["altered_similarities"])
  print("most similar distinct pairs:", results["planted"]["distinct_top_similarities"])
  print("ranks of the moved photos:", results["planted"]["moved_ranks"])
  print(f"{results['cpu']}; workdirs in {keep}")
  write_json(args.out, results)


if __name__ == "__main__":
  main()
