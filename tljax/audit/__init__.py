"""The data audit a run makes before training: exact and near duplicates within and across
splits, test images with a copy in train, suspected label errors, class counts.

``audit_splits`` is the one entry the run calls. It writes ``<workdir>/audit.json`` and
``<workdir>/audit_gallery.png`` (docs/audit.md) and returns the splits to train on (without the
train copies of test images where ``audit.remove_test_copies``) and the summary's ``audit``
field. Near duplicates and label errors read the frozen base's pooled features (the pass the
head phase caches, with the pretrained weights); past ``audit.feature_max_examples`` images
the audit is of exact duplicates and class counts only.
"""

import json
import logging
import pathlib
import time

import jax
import numpy as np

from tljax import distributed, files, sharding
from tljax.audit import duplicates, features, findings, gallery, label_errors
from tljax.data.dataset import Dataset, RowView, Split
from tljax.models import weights

GALLERY_PAIRS, GALLERY_SUSPECTS = 6, 12  # Findings the gallery shows of each kind.


def _pretrained_features(config, splits, model, view, mesh) -> dict[str, np.ndarray]:
  size = config.model.input_size
  variables = sharding.put(weights.load_pretrained(
      config.model.weights, model, input_size=size, rng=jax.random.PRNGKey(config.seed),
      cache_dir=config.model.cache_dir or None), sharding.replicated(mesh))
  return features.pooled_features(variables, splits, model=model, view=view,
                                  batch_size=config.eval_batch_size, mesh=mesh)


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


def _features_wanted(config, examples: int) -> bool:
  """Whether the audit computes features: with pretrained weights (a random base's features
  do not tell a copy from a look-alike) and up to ``audit.feature_max_examples`` images."""
  if config.model.weights == "none":
    logging.info("audit: model.weights='none': exact duplicates and class counts only")
    return False
  if examples > config.audit.feature_max_examples:
    logging.info("audit: %d images > audit.feature_max_examples=%d: exact duplicates and "
                 "class counts only", examples, config.audit.feature_max_examples)
    return False
  return True


def _suspects(features_ND, labels_N, num_classes: int, *, folds: int,
              seed: int) -> list[label_errors.Suspect]:
  """Suspected label errors, none where train has fewer examples than folds."""
  if len(labels_N) < folds:
    logging.info("audit: %d training examples are too few for %d folds: no label errors "
                 "looked for", len(labels_N), folds)
    return []
  probabilities = label_errors.out_of_sample_probabilities(features_ND, labels_N, num_classes,
                                                           folds=folds, seed=seed)
  return label_errors.confident_suspects(probabilities, labels_N)


def _key(config, dataset: Dataset, splits: dict[str, Split]) -> dict:
  """What an audit's outcome depends on: a restart that agrees reuses it."""
  return {"data": dataset.identity, "audit": config.audit.to_dict(), "seed": config.seed,
          "sizes": {split: len(s) for split, s in splits.items()},
          "weights": config.model.weights, "input_size": config.model.input_size,
          "view": [config.data.scale, config.data.eval_crop]}


def _saved(path: pathlib.Path, key: dict) -> dict | None:
  """The outcome an earlier start of this run saved at ``path``, where its key is ``key``."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return saved if saved.get("key") == json.loads(files.to_json(key)) else None


def _audit(config, workdir: pathlib.Path, dataset: Dataset, splits: dict[str, Split],
           model, view, mesh) -> dict:
  """Finds what ``audit_splits`` reports; writes ``audit.json`` and the gallery (process 0).
  Returns the summary, with the train rows to remove under ``removed_rows``."""
  settings = config.audit
  paths = findings.example_paths(dataset, splits, config.seed)
  digests = {split: duplicates.pixel_digests(s.images) for split, s in splits.items()}
  groups = duplicates.exact_groups(digests)
  pairs, suspects = [], []
  with_features = _features_wanted(config, sum(map(len, splits.values())))
  features_s = 0.0
  if with_features:
    started = time.perf_counter()
    pooled = _pretrained_features(config, splits, model, view, mesh)
    features_s = time.perf_counter() - started
    pairs = duplicates.near_pairs(pooled, digests, settings.near_duplicate_threshold)
    suspects = _suspects(pooled["train"], splits["train"].labels, dataset.num_classes,
                         folds=settings.folds, seed=config.seed)
  record = findings.audit_record(paths, groups, pairs, suspects, splits, dataset.class_names,
                                 max_listed=settings.max_listed)
  if distributed.is_main_process():
    with files.write_errors_reported("writing the audit to", workdir):
      files.write_json(workdir / "audit.json", record)
      gallery.plot_gallery(_gallery_rows(record, groups, pairs, suspects, splits),
                           workdir / "audit_gallery.png")
  leaked, train_copies = findings.copies_of("test", groups, pairs)
  removed = sorted(train_copies) if settings.remove_test_copies else []
  return {"exact_duplicate_groups": len(groups), "near_duplicate_pairs": len(pairs),
          "suspected_label_errors": len(suspects), "features": with_features,
          "test_copies_in_train": len(leaked), "features_s": features_s,
          "warning": None if removed or not leaked else
          f"{len(leaked)} test images have a copy in train: test accuracy is optimistic",
          "removed_from_train": [paths["train"][i] for i in removed], "removed_rows": removed}


def audit_splits(config, workdir: pathlib.Path, dataset: Dataset, splits: dict[str, Split],
                 model, view, mesh) -> tuple[dict[str, Split], dict | None]:
  """Audits ``splits``; writes ``audit.json`` and ``audit_gallery.png`` in ``workdir``
  (process 0); returns the splits to train on and the summary's ``audit`` field (None where
  ``audit.enabled`` is off).

  The outcome is saved in ``<workdir>/audit_state.json``: a restart of the run on the same
  data and settings reuses it, so it trains on the same examples without the pretrained
  weights (a resumed run may not have them) and without a second pass.
  """
  if not config.audit.enabled:
    return splits, None
  started, workdir = time.perf_counter(), files.make_workdir(workdir)
  key, state = _key(config, dataset, splits), workdir / "audit_state.json"
  summary = _saved(state, key)
  # Decided by every process together, before process 0 writes this start's state: a process
  # that read it after that would skip the pass the others make.
  if distributed.any_process(summary is None):
    summary = _audit(config, workdir, dataset, splits, model, view, mesh)
    summary["wall_s"] = time.perf_counter() - started
    if distributed.is_main_process():
      with files.write_errors_reported("writing the audit to", workdir):
        files.write_json(state, {**summary, "key": key})
  else:
    logging.info("audit: as this run's first start found it (%s)", state)
  summary = {k: v for k, v in summary.items() if k != "key"}
  if summary["removed_rows"]:
    splits = {**splits, "train": _without_rows(splits["train"], set(summary["removed_rows"]))}
    logging.warning("audit: %d test images had a copy in train; removed their %d train copies "
                    "(audit.remove_test_copies)", summary["test_copies_in_train"],
                    len(summary["removed_rows"]))
  elif summary["warning"]:
    logging.warning("audit: %s (the pairs are in audit.json; audit.remove_test_copies=true "
                    "removes the train copies)", summary["warning"])
  logging.info("audit: %d exact duplicate groups, %d near duplicate pairs, %d suspected label "
               "errors, in %.1f s (%s)", summary["exact_duplicate_groups"],
               summary["near_duplicate_pairs"], summary["suspected_label_errors"],
               summary["wall_s"], workdir / "audit.json")
  return splits, {k: v for k, v in summary.items() if k != "removed_rows"}
