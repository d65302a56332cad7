"""Predictions of a finished run on new images: ``python -m tljax.predict --workdir W PATH...``.

PATH is an image file (any format the folder source reads), a folder (searched recursively),
a glob (``'photos/*.jpg'``) or an IDX images file (``t10k-images-idx3-ubyte.gz``, one row per
image). Each image is brought to the stored form the run trained on (a folder run's square
RGB size; an IDX run's grey size), then goes through the run's own evaluation function
(``export.inference_function``: the evaluation view, the model, softmax), in batches. The
run's ``summary.json`` (its resolved config and class names) and ``trained_variables.msgpack``
say everything else, so no setting is repeated here; a model trained on an accelerator
predicts on the CPU.

Prints a table of the top-k classes with their probabilities; ``--output`` writes the same
as CSV or JSON (one row per image: ``path``, ``label``, ``probability``, ``top_k``).
``--export`` (re)writes ``<workdir>/export/``, every format checked, as ``python -m tljax.export``
does.
"""

import argparse
import csv
import dataclasses
import glob
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
import tqdm
from PIL import Image

from tljax import calibration, exits, export, models, reporting
from tljax.data import dataset, idx, images, transforms
from tljax.export import rerun
from tljax.models import microbatch

class PredictError(ValueError):
  """A workdir, input or output that prediction cannot use; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
  """What a finished run left for prediction."""
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  image_shape: tuple[int, ...]   # The stored form of one image: [H, W] grey or [H, W, 3].
  model: Any
  variables: Any
  view: transforms.EvalView      # How a stored image becomes model input.
  temperature: float | None = None  # Fitted after training, folded into variables' head.


def load_run(workdir: str | os.PathLike) -> Run:
  """Reads the run in ``workdir``; PredictError if it is missing or never finished."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise PredictError(f"--workdir {workdir} is not a directory; pass the work directory of a "
                       "finished run (python main.py ... --workdir W).")
  summary_path, variables_path = workdir / "summary.json", workdir / "trained_variables.msgpack"
  missing = [p.name for p in (summary_path, variables_path) if not p.is_file()]
  if missing:
    raise PredictError(f"{workdir} holds no finished run (no {' or '.join(missing)}): "
                       "rerun its training command to finish it, then predict.")
  try:
    summary = json.loads(summary_path.read_text())
    config = ml_collections.ConfigDict(summary["config"])
    class_names = tuple(summary["class_names"])
    image_shape = tuple(summary["image_shape"])
    variables = flax.serialization.msgpack_restore(variables_path.read_bytes())
  except (OSError, ValueError, KeyError) as e:
    raise PredictError(f"{workdir}: cannot read the run's outputs ({e!r}); it was written by "
                       "another version of tljax or is damaged. Train it again.") from None
  model = models.create(config.model, len(class_names))
  temperature = calibration.recorded_temperature(summary)
  return Run(config, class_names, image_shape, model,
             calibration.calibrated_variables(model, variables, temperature or 1.0),
             transforms.EvalView.from_config(config), temperature)


# ---------------------------------------------------------------------------------------------
# Inputs.


def _is_idx_images(path: pathlib.Path) -> bool:
  return path.name.removesuffix(".gz").endswith("-idx3-ubyte")


def expand_paths(patterns: Sequence[str]) -> list[pathlib.Path]:
  """Files named by ``patterns`` (files, folders searched recursively, globs), in order and
  without repeats; PredictError names a pattern that matches nothing."""
  found, empty = [], []
  for pattern in patterns:
    matches = [pathlib.Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    files = []
    for match in matches or [pathlib.Path(pattern)]:
      if match.is_dir():
        files += sorted(p for p in match.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(match).parts)
                        and (images.is_image_name(p.name) or _is_idx_images(p)))
      elif match.is_file():
        files.append(match)
    if files:
      found += files
    else:
      empty.append(pattern)
  if empty:
    raise PredictError(f"no image files at {', '.join(map(repr, empty))}: give image files, "
                       "folders of them, globs or IDX image files.")
  return list(dict.fromkeys(found))


def stored_form(path: pathlib.Path, image_shape: Sequence[int]) -> np.ndarray:
  """One image file as the run stored its images: ``image_shape`` uint8."""
  if len(image_shape) == 3:  # A folder run: the decoded cache's square RGB form.
    return images.load_stored(path, image_shape[0])
  height, width = image_shape  # An IDX run: grey, at its size.
  grey = Image.fromarray(images.load_image(path)).convert("L")
  return np.asarray(grey.resize((width, height), Image.Resampling.BILINEAR), np.uint8)


def read_inputs(paths: Sequence[pathlib.Path],
                image_shape: Sequence[int]) -> Iterator[tuple[str, np.ndarray]]:
  """``(name, uint8 image of image_shape)`` per image: one per image file, one per row of an
  IDX file (named ``file#row``). PredictError names an image that cannot be read."""
  for path in paths:
    if not _is_idx_images(path):
      try:
        yield str(path), stored_form(path, image_shape)
      except images.ImageError as e:
        raise PredictError(f"{e.path}: {e.cause}; remove it from the paths, or replace "
                           "it.") from None
      continue
    try:
      rows = idx.read_idx(path)
    except dataset.DataError as e:
      raise PredictError(str(e)) from None
    if tuple(rows.shape[1:]) != tuple(image_shape):
      raise PredictError(f"{path} holds images of shape {list(rows.shape[1:])}; this run "
                         f"takes {list(image_shape)}.")
    for i, image in enumerate(rows):
      yield f"{path}#{i}", image


# ---------------------------------------------------------------------------------------------
# Prediction.


def _batches(items: Iterator[tuple[str, np.ndarray]],
             size: int) -> Iterator[tuple[list[str], np.ndarray]]:
  names, pixels = [], []
  for name, image in items:
    names.append(name)
    pixels.append(image)
    if len(names) == size:
      yield names, np.stack(pixels)
      names, pixels = [], []
  if names:
    yield names, np.stack(pixels)


def predict(run: Run, items: Iterator[tuple[str, np.ndarray]], *, batch_size: int = 64,
            top_k: int = 3, progress: bool = True) -> list[dict[str, Any]]:
  """One row per image: path, label, probability and the ``top_k`` (label, probability)."""
  inference = export.inference_function(run.model, run.variables, run.view)
  probabilities_of = jax.jit(lambda images: microbatch.apply(inference, images, shards=1))
  k = min(top_k, len(run.class_names))
  rows = []
  with tqdm.tqdm(unit="image", desc="predicting", disable=not progress) as bar:
    for names, pixels in _batches(items, batch_size):
      # A short last batch is padded, so one compiled shape serves every batch.
      padded = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(pixels), 0)])
      probabilities = np.asarray(probabilities_of(padded))[:len(names)]
      for name, p in zip(names, probabilities):
        best = np.argsort(-p, kind="stable")[:k]
        rows.append({"path": name, "label": run.class_names[best[0]],
                     "probability": float(p[best[0]]),
                     "top_k": [[run.class_names[i], float(p[i])] for i in best]})
      bar.update(len(names))
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as an aligned text table: path, then each top-k label with its probability."""
  width = max([4, *(len(r["path"]) for r in rows)])
  lines = [f"{'path':<{width}}  top classes (probability)"]
  for r in rows:
    lines.append(f"{r['path']:<{width}}  " + ", ".join(f"{label} ({p:.3f})"
                                                      for label, p in r["top_k"]))
  return "\n".join(lines)


def check_output(path: str | os.PathLike) -> pathlib.Path:
  """``path`` as an ``--output`` file that can be written; PredictError names what is
  wrong (checked before predicting anything)."""
  path = pathlib.Path(path)
  if path.suffix not in (".csv", ".json"):
    raise PredictError(f"--output {path}: name a .csv or .json file.")
  if not path.parent.is_dir():
    raise PredictError(f"--output {path}: the folder {path.parent} does not exist; create it "
                       "or name a file in an existing folder.")
  return path


def write_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """``rows`` as CSV (``top_k`` as a JSON list) or JSON, by the file's extension."""
  path = check_output(path)
  try:
    with open(path, "w", newline="", encoding="utf-8") as f:
      if path.suffix == ".json":
        json.dump(list(rows), f, indent=1)
        return
      writer = csv.DictWriter(f, fieldnames=["path", "label", "probability", "top_k"])
      writer.writeheader()
      writer.writerows({**r, "top_k": json.dumps(r["top_k"])} for r in rows)
  except OSError as e:
    raise PredictError(f"--output {path} cannot be written: {e.strerror or e}.") from None


# ---------------------------------------------------------------------------------------------
# Command line.


def run(workdir: str, paths: Sequence[str], *, output: str | None, top_k: int,
        batch_size: int, write_export: bool) -> int:
  """The command; returns its exit code, a failure logged as one message."""
  try:
    if top_k < 1 or batch_size < 1:
      raise PredictError(f"--top_k={top_k} and --batch_size={batch_size} must be at least 1.")
    if output:
      check_output(output)
    trained = load_run(workdir)
    if write_export:  # What python -m tljax.export does, with the run's own settings.
      results = rerun.export_run(workdir, trained)
      logging.info("exported the model to %s%s", results["directory"],
                   f" (failed: {', '.join(results['failed'])})" if results["failed"] else "")
    if not paths:
      if write_export:
        return exits.DONE
      raise PredictError("no images given: python -m tljax.predict --workdir W PATH...")
    start = time.perf_counter()
    rows = predict(trained, read_inputs(expand_paths(paths), trained.image_shape),
                   batch_size=batch_size, top_k=top_k, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(format_table(rows))
    logging.info("%d images in %.1f s (%.0f images/s, decoding included)", len(rows), seconds,
                 len(rows) / seconds)
    if output:
      write_rows(rows, output)
  except PredictError as e:
    logging.error("%s", e)
    return exits.BAD_INPUT
  return exits.DONE


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tljax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("paths", nargs="*", metavar="PATH",
                      help="image files, folders, globs or IDX image files")
  parser.add_argument("--workdir", required=True, help="work directory of a finished run")
  parser.add_argument("--output", help="also write the rows to this .csv or .json file")
  parser.add_argument("--top_k", type=int, default=3, help="classes listed per image")
  parser.add_argument("--batch_size", type=int, default=64, help="images per batch")
  parser.add_argument("--export", action="store_true",
                      help="(re)write <workdir>/export/ from the run (python -m tljax.export)")
  args = parser.parse_args(argv)
  reporting.setup_logging()
  return run(args.workdir, args.paths, output=args.output, top_k=args.top_k,
             batch_size=args.batch_size, write_export=args.export)


if __name__ == "__main__":
  sys.exit(main())
