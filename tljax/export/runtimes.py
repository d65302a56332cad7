"""Each exported file in its own runtime: a callable ``uint8 images [B, ...] -> float32
probabilities [B, classes]`` per format, for the accuracy gate and benchmarks/deploy.py.

onnxruntime runs ``.onnx`` and ai-edge-litert's LiteRT interpreter (with its default XNNPACK
delegate) runs ``.tflite``; ``threads=None`` leaves each runtime's own default.
"""

import pathlib
from collections.abc import Callable

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def versions() -> dict[str, str]:
  """The runtimes (and writers) installed here, by package name."""
  from importlib import metadata
  found = {}
  for package in ("onnx", "onnxruntime", "ai-edge-litert", "tflite"):
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return found


def onnx_runner(path: pathlib.Path, threads: int | None = None) -> Runner:
  """``path`` in an onnxruntime CPU session."""
  import onnxruntime
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Errors only: its shape-merging warnings are noise.
  if threads:
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
  session = onnxruntime.InferenceSession(str(path), options,
                                         providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name

  def run(images: np.ndarray) -> np.ndarray:
    return session.run(None, {name: np.ascontiguousarray(images, np.uint8)})[0]

  return run


def tflite_runner(path: pathlib.Path, threads: int | None = None) -> Runner:
  """``path`` in a LiteRT interpreter, its input resized to each batch's size."""
  from ai_edge_litert import interpreter as litert
  model = litert.Interpreter(model_path=str(path), num_threads=threads)
  source, = model.get_input_details()
  target, = model.get_output_details()
  shape = [None]

  def run(images: np.ndarray) -> np.ndarray:
    if list(images.shape) != shape[0]:
      model.resize_tensor_input(source["index"], list(images.shape), strict=False)
      model.allocate_tensors()
      shape[0] = list(images.shape)
    model.set_tensor(source["index"], np.ascontiguousarray(images, np.uint8))
    model.invoke()
    return model.get_tensor(target["index"]).copy()

  return run


def runner(path: pathlib.Path, threads: int | None = None) -> Runner:
  """The runner of ``path``'s format (by its suffix)."""
  path = pathlib.Path(path)
  if path.suffix == ".onnx":
    return onnx_runner(path, threads)
  if path.suffix == ".tflite":
    return tflite_runner(path, threads)
  raise ValueError(f"{path}: not a .onnx or .tflite file.")


def in_batches(run: Runner, images, batch_size: int = 64) -> np.ndarray:
  """``run`` over ``images`` (an array or a ``RowView``) ``batch_size`` at a time."""
  n = len(images)
  return np.concatenate([run(np.asarray(images[np.arange(i, min(i + batch_size, n))]))
                         for i in range(0, n, batch_size)])
