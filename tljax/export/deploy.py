"""Writes every format of ``export/``, runs each file in its own runtime, and records the
results: :func:`write`.

One failure never takes the others, or the run, with it: a format that raises is one logged
message and a recorded ``error``; a file that fails the accuracy gate (``gate.py``) is kept as
``*.FAILED_GATE.*`` and recorded as failed.
"""

import json
import logging
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import files
from tljax.data import images as images_module
from tljax.data import transforms
from tljax.export import contract, gate, jax_format, onnx_format, runtimes, tflite_format
from tljax.export import graph as graph_lib
from tljax.models import microbatch

FORMATS = ("jax", "onnx", "tflite")
CALIBRATION_IMAGES = 300  # Training images whose activation ranges set the int8 scales.
# An int8 file that loses more than HOLDOUT_SHARE of what the gate allows on the validation
# split is quantized again with the layers of the network's first 1, 2, then 3 resolutions
# kept in float32 (graph.leading_stages), while it still does. Half, not all: the test split
# is another sample, and a file at the limit on one falls either side of it on the other.
MAX_FLOAT_STAGES = 3
HOLDOUT_SHARE = 0.5
PREDICTOR = "predict.py"
FILES = {("onnx", "float32"): "model.onnx", ("onnx", "int8"): "model.int8.onnx",
         ("tflite", "float32"): "model.tflite", ("tflite", "int8"): "model.int8.tflite"}


def predictor_source() -> str:
  """``export/predict.py``: ``predictor.py`` with tljax's decoding (``tljax/data/images.py``)
  written into it in place of its import."""
  source = (pathlib.Path(__file__).with_name("predictor.py")).read_text()
  decoding = pathlib.Path(images_module.__file__).read_text()
  block = re.compile(r"# <decoding>.*?# </decoding>\n", re.S)
  inlined = ("# <decoding> tljax/data/images.py, as tljax decodes and resizes images.\n"
             f"{decoding}# </decoding>\n")
  return block.sub(lambda _: inlined, source, count=1)


def calibration_batches(images, count: int = CALIBRATION_IMAGES, batch_size: int = 16,
                        seed: int = 0) -> list[np.ndarray]:
  """``count`` of ``images`` (uint8, an array or a RowView), a seeded sample in file order,
  in batches."""
  rows = np.sort(np.random.default_rng(seed).choice(len(images), min(count, len(images)),
                                                    replace=False))
  return [np.asarray(images[rows[i:i + batch_size]]) for i in range(0, len(rows), batch_size)]


def reference_probabilities(model, variables: Any, view: transforms.EvalView, images,
                            batch_size: int = 64) -> np.ndarray:
  """The JAX model's probabilities for ``images``, in float32 (as every exported file
  computes), a few images at a time."""
  model = model.clone(dtype=jnp.float32)
  inference = jax_format.inference_function(model, variables, view)
  probabilities_of = jax.jit(lambda x: microbatch.apply(inference, x, shards=1))
  n, outputs = len(images), []
  for start in range(0, n, batch_size):
    batch = np.asarray(images[np.arange(start, min(start + batch_size, n))])
    padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])
    outputs.append(np.asarray(probabilities_of(padded))[:len(batch)])
  return np.concatenate(outputs)


class _Export:
  """One export's state: the directory, the records, the test set (the gate's), the held-out
  set that chooses the int8 retry (the validation split; else the test set), the calibrated
  ranges."""

  def __init__(self, directory: pathlib.Path, test: gate.TestSet | None,
               max_int8_drop: float, holdout: gate.TestSet | None = None):
    self.directory, self.test, self.max_int8_drop = directory, test, max_int8_drop
    self.holdout = holdout
    self.records: dict[str, dict[str, Any]] = {}
    self.ranges: dict[str, tuple[float, float]] | None = None
    self.float_layers: dict[str, tuple[str, ...]] = {}  # File -> layers it keeps in float32.
    self._measured: dict[tuple, dict[str, float]] = {}

  def attempt(self, name: str, fmt: str, precision: str, make) -> None:
    """``make(path)`` writes file ``name``; then its check. An exception is one message and a
    record of the error."""
    path = self.directory / name
    record = {"format": fmt, "precision": precision}
    try:
      make(path)
      record["bytes"] = path.stat().st_size
      record.update(self.check(path, precision))
    except Exception as e:  # noqa: BLE001 - any failure of one format is recorded, not raised.
      record.update(error=f"{type(e).__name__}: {e}".splitlines()[0][:500], gate="not run")
      logging.error("export: %s was not written: %s", name, record["error"])
      path.unlink(missing_ok=True)
    self.records[name] = record

  def float_accuracy(self, fmt: str) -> float:
    record = self.records.get(FILES[(fmt, "float32")], {})
    return record.get("test_accuracy", self.test.jax_accuracy)

  def measure(self, path: pathlib.Path, split: str = "test") -> dict[str, float]:
    """``path`` in its runtime on the ``split`` split (test, or validation: the holdout):
    ``gate.measure``, once per written file."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, split)
    if key not in self._measured:
      reference = self.test if split == "test" else self.holdout
      probabilities = runtimes.in_batches(runtimes.runner(path), reference.images)
      self._measured[key] = gate.measure(probabilities, reference)
    return self._measured[key]

  def int8_holds(self, path: pathlib.Path) -> tuple[bool, str]:
    """Whether int8 ``path`` stays within ``HOLDOUT_SHARE`` of ``max_int8_drop`` of the JAX
    model on the held-out split (the test split's gate where there is none), and why."""
    if self.holdout is None:
      return self.judge(path, "int8")[1:]
    passed, reason = gate.judge(self.measure(path, "validation"), "int8",
                                self.holdout.jax_accuracy, HOLDOUT_SHARE * self.max_int8_drop,
                                split="validation")
    return passed, (f"{reason}: the retry aims at {HOLDOUT_SHARE:.0%} of the gate's "
                    f"{self.max_int8_drop:g} on this split")

  def judge(self, path: pathlib.Path, precision: str) -> tuple[dict[str, float], bool, str]:
    """``path``'s measurements, whether it passes the gate, and why."""
    measured = self.measure(path)
    fmt = "onnx" if path.suffix == ".onnx" else "tflite"
    return (measured, *gate.judge(measured, precision, self.float_accuracy(fmt),
                                  self.max_int8_drop))

  def check(self, path: pathlib.Path, precision: str) -> dict[str, Any]:
    """The gate: ``path`` in its runtime on the test split; renamed if it fails."""
    if self.test is None:
      logging.warning("export: %s written but not checked (no test split given)", path.name)
      return {"gate": "not run", "gate_reason": "no test split"}
    measured, passed, reason = self.judge(path, precision)
    record = {**measured, "gate": "passed" if passed else "failed", "gate_reason": reason}
    if passed:
      logging.info("export: %s (%.1f MB): %s; top-1 agreement with JAX %.2f%%", path.name,
                   path.stat().st_size / 1e6, reason, 100 * measured["top1_agreement"])
    else:
      failed = gate.failed_name(path)
      path.replace(failed)
      record["file"] = failed.name
      logging.warning("export: %s FAILED the accuracy gate (%s); kept as %s, not for use.",
                      path.name, reason, failed.name)
    return record


def _clear(directory: pathlib.Path, formats: Sequence[str]) -> None:
  """Removes what an earlier export of ``formats`` left (its files, failed or not)."""
  for (fmt, _), name in FILES.items():
    if fmt in formats:
      for path in (directory / name, gate.failed_name(directory / name)):
        path.unlink(missing_ok=True)


def _previous_records(directory: pathlib.Path, formats: Sequence[str]) -> dict[str, Any]:
  """What ``model.json`` recorded of the formats not written again now."""
  try:
    previous = json.loads((directory / jax_format.METADATA).read_text()).get("files", {})
  except (OSError, ValueError, AttributeError):
    return {}
  return {name: r for name, r in previous.items() if r.get("format") not in formats}


def write(directory: str | pathlib.Path, model, variables: Any, view: transforms.EvalView,
          class_names: Sequence[str], image_shape: Sequence[int], *,
          formats: Sequence[str] = FORMATS, int8: bool = True, calibration_images=None,
          test_images=None, test_labels=None, test_probabilities: np.ndarray | None = None,
          validation_images=None, validation_labels=None,
          validation_probabilities: np.ndarray | None = None,
          max_int8_drop: float = gate.MAX_INT8_DROP,
          temperature: float | None = None) -> dict[str, Any]:
  """Exports the model into ``directory``: ``formats`` (jax, onnx, tflite; int8 files too
  where ``int8``, calibrated on ``calibration_images``), ``predict.py`` and ``model.json``;
  each file checked on the test split where ``test_images`` and ``test_labels`` are given
  (``test_probabilities``: the JAX model's for them, else computed); an int8 file that fails
  there is quantized again with its first layers in float32 while it loses more than the gate
  allows on ``validation_images`` (``validation_probabilities``: the JAX model's, else
  computed; else on the test split). Returns, for
  summary.json, ``{"directory", "files": {name: record}, "failed": [names]}``; a record holds
  the file's size, test accuracy, top-1 agreement with JAX, largest probability difference
  and gate, or its error. ``temperature``: the one fitted after training, already folded
  into ``variables``' head (None: none), recorded in model.json. Never raises for one
  format's failure."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f"export formats {unknown} are not among {list(FORMATS)}.")
  test = _reference_set(model, variables, view, test_images, test_labels, test_probabilities)
  written = [f for f in ("onnx", "tflite") if f in formats]
  holdout = (_reference_set(model, variables, view, validation_images, validation_labels,
                            validation_probabilities)
             if int8 and written and test is not None else None)
  state = _Export(directory, test, max_int8_drop, holdout)
  previous = _previous_records(directory, formats)
  _clear(directory, formats)
  meta = {**contract.metadata(class_names, image_shape, view),
          "calibration": contract.calibration(temperature)}
  if "jax" in formats:
    _write_jax(state, meta, model, variables, view, image_shape)
  if written:
    _write_deployable(state, written, model, variables, view, image_shape,
                      calibration_images if int8 else None, int8)
    (directory / PREDICTOR).write_text(predictor_source())
  records = {**previous, **state.records}
  failed = sorted(name for name, r in records.items() if r.get("error") or r.get("gate") == "failed")
  files.write_json(directory / jax_format.METADATA, {
      **meta, "jax_test_accuracy": test.jax_accuracy if test else None,
      "max_int8_drop": max_int8_drop, "files": records, "runtimes": runtimes.versions()})
  return {"directory": str(directory), "files": records, "failed": failed}


def _reference_set(model, variables, view, images, labels,
                   probabilities=None) -> gate.TestSet | None:
  """``images`` and ``labels`` with the JAX model's probabilities (``probabilities``, else
  computed); None without labelled images."""
  if images is None or labels is None or not len(labels):
    return None
  if probabilities is None:
    probabilities = reference_probabilities(model, variables, view, images)
  return gate.TestSet(images, np.asarray(labels), np.asarray(probabilities, np.float32))


def _write_jax(state: _Export, meta: dict, model, variables, view, image_shape) -> None:
  path = state.directory / jax_format.ARTIFACT
  try:
    meta.update(jax_format.write(state.directory, model, variables, view, image_shape))
    state.records[path.name] = {"format": "jax", "precision": "float32",
                                "bytes": path.stat().st_size, "gate": "reference"}
  except Exception as e:  # noqa: BLE001
    error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
    logging.error("export: %s was not written: %s", path.name, error)
    state.records[path.name] = {"format": "jax", "precision": "float32", "error": error}


def _write_deployable(state: _Export, formats: Sequence[str], model, variables, view,
                      image_shape, calibration_images, int8: bool) -> None:
  """The ONNX and LiteRT files of ``formats``, float32 then int8."""
  try:
    graph = graph_lib.build(model, variables, view, image_shape)
  except Exception as e:  # noqa: BLE001 - recorded against every file it would have made.
    error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
    logging.error("export: no ONNX or LiteRT files: %s", error)
    for (fmt, precision), name in FILES.items():
      if fmt in formats and (precision == "float32" or int8):
        state.records[name] = {"format": fmt, "precision": precision, "error": error}
    return
  batches = calibration_batches(calibration_images) if calibration_images is not None else None

  with tempfile.TemporaryDirectory(prefix="tljax_export") as scratch:
    float_onnx = (state.directory if "onnx" in formats else pathlib.Path(scratch)) / "model.onnx"
    if "onnx" in formats:
      state.attempt(FILES["onnx", "float32"], "onnx", "float32",
                    lambda path: onnx_format.write(graph, path))
    if int8:
      def quantize_onnx(path, float_layers):
        if batches is None:
          raise ValueError("no calibration images given (int8 needs the training images)")
        source = float_onnx if float_onnx.is_file() else onnx_format.write(
            graph, pathlib.Path(scratch) / "model.onnx")
        ranges = onnx_format.quantize(source, path, batches, float_layers,
                                      ranges_cache=pathlib.Path(scratch) / "ranges.json")
        state.ranges = state.ranges or ranges  # Every layer's: from the all-int8 file.
      if "onnx" in formats:
        state.attempt(FILES["onnx", "int8"], "onnx", "int8", lambda path: _int8_with_float_prefix(
            state, graph, path, lambda layers: quantize_onnx(path, layers)))
      elif batches is not None:  # LiteRT's int8 takes its ranges from the same calibration.
        try:
          quantize_onnx(pathlib.Path(scratch) / "model.int8.onnx", ())
        except Exception as e:  # noqa: BLE001 - then the LiteRT int8 file records it.
          logging.error("export: int8 calibration failed: %s", e)
    if "tflite" in formats:
      state.attempt(FILES["tflite", "float32"], "tflite", "float32",
                    lambda path: tflite_format.write(graph, path))
      if int8:
        def tflite_int8(path):
          if state.ranges is None:
            raise ValueError("no calibration images given (int8 needs the training images)"
                             if batches is None else "the int8 calibration (through "
                             "onnxruntime) failed; see the message above")
          _int8_with_float_prefix(state, graph, path, lambda layers: tflite_format.write(
              graph, path, state.ranges, float_layers=layers))
        state.attempt(FILES["tflite", "int8"], "tflite", "int8", tflite_int8)
    for name in (FILES["onnx", "int8"], FILES["tflite", "int8"]):
      if name in state.records and "bytes" in state.records[name]:
        state.records[name]["float32_layers"] = list(state.float_layers[name])


def _int8_with_float_prefix(state: _Export, graph: graph_lib.Graph, path: pathlib.Path,
                            write) -> None:
  """Writes int8 ``path`` with ``write(float_layers)``: every layer in int8, then, while the
  file loses too much on the held-out split (``_Export.int8_holds``), with the layers of the
  network's first 1, 2, then 3 resolutions in float32 (recorded in ``state.float_layers``)."""
  for stages in range(MAX_FLOAT_STAGES + 1):
    state.float_layers[path.name] = graph_lib.leading_stages(graph, stages)
    write(state.float_layers[path.name])
    if state.test is None or stages == MAX_FLOAT_STAGES:
      return
    passed, reason = state.int8_holds(path)
    if passed:
      return
    logging.info("export: %s with %s in float32: %s; quantizing again with the first %d "
                 "resolution(s) in float32", path.name, f"the first {stages} resolution(s)"
                 if stages else "no layer", reason, stages + 1)
