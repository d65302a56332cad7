#!/usr/bin/env python3
"""Predicts the classes of image files with an exported tljax model: NumPy, Pillow and the
model's runtime, nothing else (no jax, flax or tljax).

    python predict.py [--model FILE] PATH... [--output FILE.csv] [--top_k K]

FILE is ``model.onnx`` (needs ``onnxruntime``), ``model.int8.onnx``, ``model.tflite`` or
``model.int8.tflite`` (need ``ai-edge-litert``), with its ``model.json`` beside it; by default
the ``model.onnx`` beside this script, else its ``model.tflite``. PATH is an image file or a
folder (searched recursively for JPEG, PNG, BMP, GIF, WebP and TIFF files). Each image is
decoded and resized to the model's stored size exactly as tljax does (the decoding code
below is tljax's own, ``tljax/data/images.py``), then the model (which holds the run's
evaluation preprocessing) gives its class probabilities.

Prints the top classes of each image; ``--output`` writes a CSV (``path,label,probability``:
the top class, one row per image). An image that cannot be read is one message on stderr;
the others are still predicted, and the exit code is then 2.
"""

import argparse
import csv
import json
import pathlib
import sys

import numpy as np
from PIL import Image

# <decoding> tljax/data/images.py, written out in full in an exported predict.py.
from tljax.data.images import ImageError, is_image_name, load_image, load_stored  # noqa: E402
# </decoding>

BATCH = 32


class InputError(ValueError):
  """A model, path or option this script cannot use; the message says which."""


def default_model() -> pathlib.Path:
  here = pathlib.Path(__file__).resolve().parent
  for name in ("model.onnx", "model.tflite"):
    if (here / name).is_file():
      return here / name
  raise InputError(f"no model.onnx or model.tflite beside {__file__}: pass --model FILE.")


def onnx_session(path: pathlib.Path):
  try:
    import onnxruntime
  except ImportError:
    raise InputError(f"{path} needs onnxruntime: pip install onnxruntime") from None
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  session = onnxruntime.InferenceSession(str(path), options,
                                         providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda images: session.run(None, {name: images})[0]


def litert_interpreter(path: pathlib.Path):
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    raise InputError(f"{path} needs LiteRT: pip install ai-edge-litert") from None
  model = Interpreter(model_path=str(path))
  source, target = model.get_input_details()[0], model.get_output_details()[0]

  def run(images):
    model.resize_tensor_input(source["index"], list(images.shape), strict=False)
    model.allocate_tensors()
    model.set_tensor(source["index"], images)
    model.invoke()
    return model.get_tensor(target["index"]).copy()

  return run


def load_model(path: pathlib.Path):
  """``(run, metadata)``: the model as ``uint8 images -> probabilities``, and its
  ``model.json``."""
  if not path.is_file():
    raise InputError(f"--model {path}: no such file.")
  try:
    metadata = json.loads((path.parent / "model.json").read_text())
  except (OSError, ValueError) as e:
    raise InputError(f"{path.parent / 'model.json'} cannot be read ({e}); it holds the class "
                     "names and input size, and comes with the model.") from None
  if path.suffix == ".onnx":
    return onnx_session(path), metadata
  if path.suffix == ".tflite":
    return litert_interpreter(path), metadata
  raise InputError(f"--model {path}: give a .onnx or .tflite file.")


def stored_form(path: pathlib.Path, image_shape) -> np.ndarray:
  """One image file as the model takes it: uint8 of ``image_shape`` (tljax's stored form)."""
  if len(image_shape) == 3:  # A folder run: square RGB (tljax.data.images.load_stored).
    return load_stored(path, image_shape[0])
  height, width = image_shape  # An IDX run: grey (tljax.predict.stored_form).
  grey = Image.fromarray(load_image(path)).convert("L")
  return np.asarray(grey.resize((width, height), Image.Resampling.BILINEAR), np.uint8)


def image_files(paths) -> tuple[list[pathlib.Path], list[str]]:
  """The files ``paths`` name (folders searched recursively), and a message per path that
  names nothing."""
  found, problems = [], []
  for given in paths:
    path = pathlib.Path(given)
    if path.is_dir():
      inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name)
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
      found += inside
      if not inside:
        problems.append(f"{path}: no image files in this folder.")
    elif path.is_file():
      found.append(path)
    else:
      problems.append(f"{path}: no such file or folder.")
  return list(dict.fromkeys(found)), problems


def predict(run, images: list[np.ndarray]) -> np.ndarray:
  return np.concatenate([run(np.stack(images[i:i + BATCH]))
                         for i in range(0, len(images), BATCH)])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
  parser.add_argument("--model", help="the .onnx or .tflite file (default: model.onnx here)")
  parser.add_argument("--output", help="also write path,label,probability to this .csv file")
  parser.add_argument("--top_k", type=int, default=3, help="classes printed per image")
  args = parser.parse_args(argv)
  try:
    if args.top_k < 1:
      raise InputError(f"--top_k={args.top_k} must be at least 1.")
    if args.output and not args.output.endswith(".csv"):
      raise InputError(f"--output {args.output}: name a .csv file.")
    run, metadata = load_model(pathlib.Path(args.model) if args.model else default_model())
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  image_shape = metadata["input"]["shape"][1:]
  paths, problems = image_files(args.paths)
  names, images = [], []
  for path in paths:
    try:
      images.append(stored_form(path, image_shape))
      names.append(str(path))
    except ImageError as e:
      problems.append(str(e))
  for problem in problems:
    print(f"error: {problem}", file=sys.stderr)
  if not images:
    print("error: no image could be read.", file=sys.stderr)
    return 2
  probabilities = predict(run, images)
  classes = metadata["class_names"]
  k = min(args.top_k, len(classes))
  width = max(len("path"), *map(len, names))
  print(f"{'path':<{width}}  top classes (probability)")
  for name, p in zip(names, probabilities):
    best = np.argsort(-p, kind="stable")[:k]
    print(f"{name:<{width}}  " + ", ".join(f"{classes[i]} ({p[i]:.3f})" for i in best))
  if args.output:
    try:
      with open(args.output, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "probability"])
        for name, p in zip(names, probabilities):
          writer.writerow([name, classes[int(p.argmax())], float(p.max())])
    except OSError as e:
      print(f"error: --output {args.output} cannot be written: {e.strerror or e}.",
            file=sys.stderr)
      return 2
  return 2 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
