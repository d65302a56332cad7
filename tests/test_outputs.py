"""tljax.outputs: what a finished run writes to its workdir (conftest's tiny_idx_run): the
test predictions and report, the trained variables (the last checkpoint's), plots, the
export and summary.json."""

import json

import jax
import numpy as np
import pytest

from helpers import read_records, read_variables, saved_checkpoint
from tljax import evaluate, files


def test_run_writes_every_output(tiny_idx_run):
  workdir, summary = tiny_idx_run
  for name in ("metrics.jsonl", "summary.json", "confusion_matrix.png", "samples.png",
               "curves.png", "test_predictions.npz", "trained_variables.msgpack",
               "export/model.jax_exported", "export/model.json"):
    assert (workdir / name).stat().st_size > 0, name
  trained = read_variables(workdir)
  _, _, state = saved_checkpoint(workdir)
  for a, b in zip(jax.tree.leaves(trained),
                  jax.tree.leaves({k: state[k] for k in ("batch_stats", "params")})):
    np.testing.assert_array_equal(a, np.asarray(b))
  saved = json.loads((workdir / "summary.json").read_text())
  recount = np.load(workdir / "test_predictions.npz")
  assert saved["test_accuracy"] == pytest.approx(
      np.mean(recount["labels"] == recount["predictions"]), abs=1e-12)
  assert len(recount["labels"]) == saved["test_examples"] == 40
  report = saved["classification_report"]
  assert [c["support"] for c in report["classes"]] == [4] * 10
  assert report["accuracy"] == pytest.approx(saved["test_accuracy"])
  np.testing.assert_array_equal(np.argmax(recount["probabilities"], 1), recount["predictions"])
  assert report["top5_accuracy"] == pytest.approx(evaluate.top_k_accuracy(
      recount["labels"], recount["probabilities"], 5))
  records = read_records(workdir)
  assert all(0 <= r["accuracy"] <= 1 for r in records)  # Step and epoch records alike.
  epochs = [(r["phase"], r["epoch"]) for r in records if r["kind"] == "epoch"]
  assert epochs == [(0, 1), (0, 2), (1, 1)]
  assert all(r["val_accuracy"] is not None for r in records if r["kind"] == "epoch")
  assert [p["name"] for p in saved["phases"]] == ["frozen_base", "fine_tune"]
  assert saved["phases"][0]["trainable_params"] == 1280 * 10 + 10
  assert saved["phases"][0]["cached_prefix"] == ["global_average_pooling2d"]
  # Phase 2's prefix (layers[:100], frozen in phase 1 too) came from phase 1's caching pass.
  assert saved["phases"][1]["cached_prefix"] == ["block_10_project_BN", "block_11_expand_relu"]
  assert [p["prefix_cached_by_previous_phase"] for p in saved["phases"]] == [False, True]


def test_summary_names_the_data_the_run_and_its_config(tiny_idx_run):
  workdir, summary = tiny_idx_run
  saved = json.loads((workdir / "summary.json").read_text())
  assert saved["dataset"] == "mnist" and saved["class_names"] == [str(i) for i in range(10)]
  assert saved["split_sizes"] == {"train": 128, "validation": 32, "test": 40}
  assert saved["image_shape"] == [28, 28] and saved["skipped_images"] == []
  assert (saved["processes"], len(saved["devices"])) == (1, jax.device_count())
  assert saved["config"]["batch_size"] == 16 and saved["config"]["model"]["alpha"] == 0.35
  assert saved["weights_from"] == saved["phases"][-1]["weights_from"]
  assert json.loads(files.to_json(summary)) == saved  # What train.run returned is written.
  assert np.load(workdir / "test_predictions.npz")["probabilities"].shape == (40, 10)
  for plot in ("confusion_matrix.png", "samples.png", "curves.png"):
    assert (workdir / plot).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), plot
