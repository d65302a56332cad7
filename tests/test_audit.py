"""The data audit (tljax/audit/): exact and near duplicates, test copies in train, suspected
label errors, and what a run writes of it."""

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import folder_config
from tljax import audit, models, sharding
from tljax.audit import duplicates, findings, label_errors
from tljax.data import load, transforms
from tljax.data.dataset import Dataset, Split
from tljax.models import weights

CLASSES = ("dress", "hat", "pants", "shoes", "t-shirt")


def test_exact_groups_span_splits_in_row_order():
  digests = {"train": [b"a", b"b", b"a"], "validation": [b"c"], "test": [b"b", b"d", b"a"]}
  assert duplicates.exact_groups(digests) == [
      [("train", 0), ("train", 2), ("test", 2)], [("train", 1), ("test", 0)]]


def test_pixel_digests_tell_one_changed_pixel():
  images = np.zeros((3, 4, 4, 3), np.uint8)
  images[2, 1, 1, 0] = 1
  first, second, third = duplicates.pixel_digests(images)
  assert first == second != third


def test_near_pairs_are_above_the_threshold_across_splits_and_once_within_train():
  rng = np.random.default_rng(0)
  train, test = rng.normal(size=(5, 64)), rng.normal(size=(3, 64))
  test[0] = train[1] + 0.1 * rng.normal(size=64)
  train[4] = train[0] + 0.1 * rng.normal(size=64)
  features = {"train": train, "validation": np.zeros((0, 64)), "test": test}
  digests = {"train": [b"a", b"b", b"c", b"d", b"e"], "validation": [], "test": [b"f", b"g", b"h"]}
  pairs = duplicates.near_pairs(features, digests, threshold=0.86)
  assert sorted((a, b) for a, b, _ in pairs) == [(("train", 0), ("train", 4)),
                                                 (("train", 1), ("test", 0))]
  assert all(0.97 < s < 1 for *_, s in pairs)
  digests["test"][0] = b"b"  # The same pixels: an exact duplicate, not a near one.
  assert [(a, b) for a, b, _ in duplicates.near_pairs(features, digests, threshold=0.86)] == [
      (("train", 0), ("train", 4))]


def test_similar_pairs_is_the_cosine_similarity():
  a, b = np.array([[1.0, 0.0], [3.0, 4.0]]), np.array([[0.6, 0.8], [0.0, -1.0]])
  assert duplicates.similar_pairs(a, b, 0.7, same=False) == [(1, 0, pytest.approx(1.0))]
  assert duplicates.similar_pairs(a, a, 0.7, same=True) == []


def test_planted_label_flips_rank_first_with_their_true_class():
  rng = np.random.default_rng(0)
  true = np.repeat(np.arange(4), 50).astype(np.int32)
  features = rng.normal(size=(4, 32))[true] * 3 + rng.normal(size=(200, 32))
  flipped = np.array([3, 60, 110, 170, 190])
  given = true.copy()
  given[flipped] = (true[flipped] + 1) % 4
  probabilities = label_errors.out_of_sample_probabilities(features, given, 4, folds=5)
  suspects = label_errors.confident_suspects(probabilities, given)
  assert sorted(s.index for s in suspects[:5]) == sorted(flipped)
  assert all(s.suggested == true[s.index] for s in suspects[:5])
  assert [s.score for s in suspects] == sorted((s.score for s in suspects), reverse=True)
  assert len(suspects) <= 8  # The clean examples of a separable set are not suspected.


def test_copies_of_test_link_exact_groups_and_near_pairs():
  groups = [[("train", 4), ("test", 1)], [("train", 2), ("validation", 0)]]
  pairs = [(("train", 7), ("test", 3), 0.97), (("train", 0), ("train", 1), 0.99)]
  assert findings.copies_of("test", groups, pairs) == ({1, 3}, {4, 7})


def test_idx_examples_are_named_by_their_rows_in_the_source_splits():
  def split(n):
    return Split(np.zeros((n, 2, 2), np.uint8), np.zeros(n, np.int32))

  dataset = Dataset(split(10), split(3), 1, ("a",), "x", "id")  # No split_files: not a folder.
  paths = findings.example_paths(dataset, {"train": split(6), "validation": split(2),
                                           "test": split(3)}, seed=0)
  assert paths == {"train": [f"train/{i}" for i in range(6)],
                   "validation": ["train/6", "train/7"], "test": ["test/0", "test/1", "test/2"]}


def _photo_folder(root, shared_dir):
  """6 train and 2 test photos of 5 clothing-small classes, a test photo copied into train
  as it is and another cropped by 5% a side, resized to 80% and re-encoded (as
  benchmarks/audit.py plants them)."""
  source = shared_dir / "data" / "clothing-small"
  for name in CLASSES:
    for split, n in (("train", 6), ("test", 2)):
      (root / split / name).mkdir(parents=True)
      for photo in sorted((source / split / name).iterdir())[:n]:
        shutil.copyfile(photo, root / split / name / photo.name)
  exact, altered = sorted((root / "test" / "hat").iterdir())
  shutil.copyfile(exact, root / "train" / "hat" / "copy.jpg")
  with Image.open(altered) as image:
    w, h = image.size
    image.convert("RGB").crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize(
        (w * 4 // 5, h * 4 // 5)).save(root / "train" / "hat" / "altered.jpg", quality=75)
  return root, exact.relative_to(root).as_posix(), altered.relative_to(root).as_posix()


@pytest.fixture(scope="module")
def photo_audit(tmp_path_factory, shared_dir, imagenet_weights_path):
  """``audit(workdir, **audit settings) -> (splits, summary, audit.json)`` on the photo folder
  with the ImageNet weights at 160 px, and the two leaked test photos' paths."""
  root, exact, altered = _photo_folder(tmp_path_factory.mktemp("photos"), shared_dir)
  mesh = sharding.data_mesh()

  def run(workdir, **settings):
    config = folder_config(root, validation_split=0.0)
    config.model.input_size, config.model.weights = 160, str(imagenet_weights_path)
    config.eval_batch_size = 48
    config.audit.update(settings)
    dataset, splits = load.load_splits(config, workdir)
    model = models.create(config.model, dataset.num_classes, 1)
    kept, summary = audit.audit_splits(config, workdir, dataset, splits, model,
                                       transforms.EvalView.from_config(config), mesh)
    return splits, kept, summary, json.loads((workdir / "audit.json").read_text())

  return run, exact, altered


def test_photo_copies_are_found_and_distinct_photos_not_paired(photo_audit, tmp_path,
                                                               monkeypatch):
  run, exact, altered = photo_audit
  splits, kept, summary, record = run(tmp_path, remove_test_copies=True)
  assert record["exact_duplicates"] == [{"paths": ["train/hat/copy.jpg", exact]}]
  assert [p["paths"] for p in record["near_duplicates"]] == [["train/hat/altered.jpg", altered]]
  assert record["near_duplicates"][0]["similarity"] > 0.86
  assert record["class_counts"]["train"] == {name: 8 if name == "hat" else 6 for name in CLASSES}
  assert record["class_counts"]["test"] == {name: 2 for name in CLASSES}
  assert summary["test_copies_in_train"] == 2 and summary["warning"] is None
  assert summary["removed_from_train"] == ["train/hat/altered.jpg", "train/hat/copy.jpg"]
  assert len(kept["train"]) == len(splits["train"]) - 2
  assert kept["test"] is splits["test"]
  assert (tmp_path / "audit_gallery.png").stat().st_size > 10_000
  # A restart reuses the outcome: the same examples, without the weights or a second pass.
  monkeypatch.setattr(weights, "load_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
  _, again, summary_again, _ = run(tmp_path, remove_test_copies=True)
  assert summary_again == summary
  np.testing.assert_array_equal(again["train"].labels, kept["train"].labels)


def test_leaked_test_copies_are_a_warning_without_removal(photo_audit, tmp_path, caplog):
  run, exact, _ = photo_audit
  with caplog.at_level(logging.WARNING):
    splits, kept, summary, record = run(tmp_path, feature_max_examples=0)
  assert summary["warning"] == "1 test images have a copy in train: test accuracy is optimistic"
  assert summary["warning"] in caplog.text
  assert kept["train"] is splits["train"] and summary["removed_from_train"] == []
  assert record["near_duplicates"] == [] and record["suspected_label_errors"] == []


def test_a_folder_run_writes_the_audit_and_its_summary(tiny_folder_run):
  root, workdir, summary = tiny_folder_run
  record = json.loads((workdir / "audit.json").read_text())
  assert list(record) == ["exact_duplicates", "near_duplicates", "suspected_label_errors",
                          "class_counts"]
  listed = {path for split in ("train", "validation", "test")
            for path in (workdir / "splits" / f"{split}.txt").read_text().split()}
  named = {p for group in record["exact_duplicates"] for p in group["paths"]}
  assert named and named <= listed  # Paths relative to the data root.
  # Each class's images are identical (helpers.write_image): every test image leaks.
  test_count = sum(record["class_counts"]["test"].values())
  assert summary["audit"]["test_copies_in_train"] == test_count
  assert summary["audit"]["warning"].startswith(f"{test_count} test images have a copy")
  assert json.loads((workdir / "summary.json").read_text())["audit"] == summary["audit"]
  assert (workdir / "audit_gallery.png").exists()


def test_an_idx_run_with_random_weights_audits_pixels_and_counts(tiny_idx_run):
  workdir, summary = tiny_idx_run
  record = json.loads((workdir / "audit.json").read_text())
  sizes = summary["split_sizes"]
  assert {split: sum(counts.values()) for split, counts in record["class_counts"].items()} == sizes
  # Random weights (tiny_config): no features, so exact duplicates (none here) and counts.
  assert not summary["audit"]["features"] and summary["audit"]["warning"] is None
  assert record["near_duplicates"] == record["suspected_label_errors"] == []
