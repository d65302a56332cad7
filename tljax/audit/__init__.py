"""The data audit a run makes before training: exact and near duplicates within and across
splits, test images with a copy in train, suspected label errors, class counts.

``audit_splits`` is the one entry the run calls. It writes ``<workdir>/audit.json`` and
``<workdir>/audit_gallery.png`` (docs/audit.md) and returns the splits to train on (without the
train copies of test images where ``audit.remove_test_copies``) and the summary's ``audit``
field. Near duplicates and label errors read the frozen base's pooled features (the pass the
head phase caches, with the pretrained weights); past ``audit.feature_max_examples`` images
the audit is of exact duplicates and class counts only.
"""

import logging
import pathlib
import time

import jax
import numpy as np

from tljax import distributed, files, sharding
from tljax.audit import duplicates, features, findings, gallery, label_errors
from tljax.data import sources
from tljax.data.dataset import Dataset, RowView, Split
from tljax.models import weights

GALLERY_PAIRS, GALLERY_SUSPECTS = 6, 12  # Findings the gallery shows of each kind.


def _pretrained_features(config, splits, model, view, mesh) -> dict[str, np.ndarray]:
  size = config.model.input_size
  variables = sharding.put(weights.load_pretrained(
      config.model.weights, model, input_size=size, rng=jax.random.PRNGKey(config.seed),
      cache_dir=config.model.cache_dir or None), sharding.replicated(mesh))
  return features.pooled_features(variables, sources.sources(splits, mesh), model=model,
                                  view=view, batch_size=config.eval_batch_size, mesh=mesh)


def _without_rows(split: Split, rows: set[int]) -> Split:
  keep = np.array([i for i in range(len(split)) if i not in rows], np.int64)
  images = split.images
  kept = (RowView(images.source, images.rows[keep]) if isinstance(images, RowView)
          else images[keep])
  return Split(kept, split.labels[keep])


def _gallery_rows(record: dict, groups, pairs, suspects, splits) -> list[list[gallery.Panel]]:
  """Rows of panels: exact pairs, near pairs (three a row), then suspected label errors."""
  def image(example):
    return np.asarray(splits[example[0]].images[example[1]])

  exact = [panel for group, listed in zip(groups, record["exact_duplicates"])
           for panel in gallery.pair_panels("exact", [image(e) for e in group[:2]],
                                            listed["paths"][:2])][:2 * GALLERY_PAIRS]
  near = [panel for (a, b, _), listed in zip(pairs, record["near_duplicates"])
          for panel in gallery.pair_panels("near", [image(a), image(b)], listed["paths"],
                                           f" {listed['similarity']:.3f}")][:2 * GALLERY_PAIRS]
  wrong = [gallery.suspect_panel(image(("train", s.index)), listed["path"], listed["label"],
                                 listed["suggested"], listed["score"])
           for s, listed in zip(suspects, record["suspected_label_errors"])][:GALLERY_SUSPECTS]
  every = gallery.COLUMNS
  return [panels[i:i + every] for panels in (exact, near, wrong)
          for i in range(0, len(panels), every)]


def audit_splits(config, workdir: pathlib.Path, dataset: Dataset, splits: dict[str, Split],
                 model, view, mesh) -> tuple[dict[str, Split], dict]:
  """Audits ``splits``; writes ``audit.json`` and ``audit_gallery.png`` in ``workdir``
  (process 0); returns the splits to train on and the summary's ``audit`` field."""
  settings, started = config.audit, time.perf_counter()
  if not settings.enabled:
    return splits, None
  paths = findings.example_paths(dataset, splits, config.seed)
  digests = {split: duplicates.pixel_digests(s.images) for split, s in splits.items()}
  groups = duplicates.exact_groups(digests)
  pairs, suspects = [], []
  with_features = sum(map(len, splits.values())) <= settings.feature_max_examples
  if with_features:
    pooled = _pretrained_features(config, splits, model, view, mesh)
    pairs = duplicates.near_pairs(pooled, digests, settings.near_duplicate_threshold)
    probabilities = label_errors.out_of_sample_probabilities(
        pooled["train"], splits["train"].labels, dataset.num_classes, folds=settings.folds,
        seed=config.seed)
    suspects = label_errors.confident_suspects(probabilities, splits["train"].labels)
  else:
    logging.info("audit: %d images > audit.feature_max_examples=%d: exact duplicates and "
                 "class counts only", sum(map(len, splits.values())),
                 settings.feature_max_examples)
  record = findings.audit_record(paths, groups, pairs, suspects, splits, dataset.class_names,
                                 max_listed=settings.max_listed)
  if distributed.is_main_process():
    workdir = files.make_workdir(workdir)
    with files.write_errors_reported("writing the audit to", workdir):
      files.write_json(workdir / "audit.json", record)
      gallery.plot_gallery(_gallery_rows(record, groups, pairs, suspects, splits),
                           workdir / "audit_gallery.png")
  leaked, train_copies = findings.copies_of("test", groups, pairs)
  summary = {"exact_duplicate_groups": len(groups), "near_duplicate_pairs": len(pairs),
             "suspected_label_errors": len(suspects), "features": with_features,
             "test_copies_in_train": len(leaked), "warning": None, "removed_from_train": []}
  if leaked and settings.remove_test_copies:
    summary["removed_from_train"] = sorted(paths["train"][i] for i in train_copies)
    splits = {**splits, "train": _without_rows(splits["train"], train_copies)}
    logging.warning("audit: %d test images had a copy in train; removed their %d train copies "
                    "(audit.remove_test_copies)", len(leaked), len(train_copies))
  elif leaked:
    summary["warning"] = (f"{len(leaked)} test images have a copy in train: test accuracy is "
                          "optimistic")
    logging.warning("audit: %s (the pairs are in audit.json; audit.remove_test_copies=true "
                    "removes the train copies)", summary["warning"])
  summary["wall_s"] = time.perf_counter() - started
  logging.info("audit: %d exact duplicate groups, %d near duplicate pairs, %d suspected label "
               "errors, in %.1f s (%s)", len(groups), len(pairs), len(suspects),
               summary["wall_s"], workdir / "audit.json")
  return splits, summary
