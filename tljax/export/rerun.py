"""(Re)exports a finished run from its work directory: ``python -m tljax.export`` and
``python -m tljax.predict --export``.

The run's model, weights and evaluation view come from ``tljax.predict.load_run``; its
training images (int8 calibration) and test split (the accuracy gate) from its own data, as
its config and ``<workdir>/splits`` cut them. Without its data the float32 files are still
written, unchecked, and the int8 ones are recorded as not written.
"""

import json
import logging
import pathlib
from typing import Any

from tljax import files
from tljax.data import dataset, load
from tljax.export import deploy, gate


def export_settings(config) -> dict[str, Any]:
  """The run's ``export`` section (formats, int8, max_int8_drop); every format, int8 and
  :data:`gate.MAX_INT8_DROP` for a run from before that section existed."""
  section = config.get("export") or {}  # Read from a finished run's summary.json.
  return {"formats": tuple(section.get("formats", deploy.FORMATS)),
          "int8": bool(section.get("int8", True)),
          "max_int8_drop": float(section.get("max_int8_drop", gate.MAX_INT8_DROP))}


def _splits(run, workdir: pathlib.Path):
  try:
    _, splits = load.load_splits(run.config, workdir)
  except (dataset.DataError, OSError, ValueError) as e:
    logging.warning("export: the run's data cannot be loaded (%s); int8 files need its "
                    "training images and every file's check its test split.", e)
    return None
  if tuple(splits["test"].images.shape[1:]) != tuple(run.image_shape):
    logging.warning("export: the run's data now gives images of shape %s, not the %s it "
                    "trained on; files are written unchecked, without int8.",
                    list(splits["test"].images.shape[1:]), list(run.image_shape))
    return None
  return splits


def export_run(workdir: str | pathlib.Path, run, **settings) -> dict[str, Any]:
  """Exports ``run`` (``tljax.predict.load_run(workdir)``) into ``<workdir>/export`` with
  the run's own export settings, each overridden by ``settings`` (``formats``, ``int8``,
  ``max_int8_drop``), and records the results in ``summary.json`` under ``export``; returns
  them."""
  settings = {**export_settings(run.config), **settings}
  workdir = pathlib.Path(workdir)
  splits = _splits(run, workdir)
  results = deploy.write(
      workdir / "export", run.model, run.variables, run.view, run.class_names, run.image_shape,
      formats=settings["formats"], int8=settings["int8"],
      calibration_images=splits["train"].images if splits else None,
      test_images=splits["test"].images if splits else None,
      test_labels=splits["test"].labels if splits else None,
      validation_images=splits["validation"].images if splits else None,
      validation_labels=splits["validation"].labels if splits else None,
      max_int8_drop=settings["max_int8_drop"], temperature=run.temperature)
  summary_path = workdir / "summary.json"
  try:
    summary = json.loads(summary_path.read_text())
    summary["export"] = results
    files.write_json(summary_path, summary)
  except (OSError, ValueError) as e:
    logging.warning("export: summary.json not updated (%s)", e)
  return results
