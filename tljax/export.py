"""The trained model as a program that needs only JAX: ``<workdir>/export/``.

A run ends by exporting its whole inference function, uint8 images in and class probabilities
out, with the evaluation preprocessing and the trained weights inside, through
``jax.export``, for any batch size. The directory holds:

* ``model.jax_exported``: the serialized ``jax.export.Exported`` (StableHLO and weights);
* ``model.json``: the class names, the input shape and dtype (``null`` for the batch), the
  output shape and the platforms the artifact runs on.

Another program loads it with nothing but ``jax`` and ``numpy``::

    exported = jax.export.deserialize(open("export/model.jax_exported", "rb").read())
    probabilities = exported.call(images_uint8)  # [B, *input_shape] -> [B, classes]
"""

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import files
from tljax.data import transforms

ARTIFACT = "model.jax_exported"
METADATA = "model.json"


def inference_function(model, variables: Any, view: transforms.EvalView):
  """``uint8 images [B, *image_shape] -> float32 probabilities [B, classes]``: ``view``, the
  model and a softmax, with ``variables`` held as constants."""
  variables = jax.device_get(variables)

  def probabilities(images):
    logits = model.apply(variables, view(images))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return probabilities


def platforms() -> tuple[str, ...]:
  """Where an artifact exported here runs: this platform and the CPU."""
  return tuple(dict.fromkeys(("cpu", jax.export.default_export_platform())))


def export_model(model, variables: Any, view: transforms.EvalView,
                 image_shape: Sequence[int]) -> jax.export.Exported:
  """Exports :func:`inference_function` for uint8 images of ``image_shape`` ([H, W] grey or
  [H, W, C]) and a symbolic batch size."""
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
  function = jax.jit(inference_function(model, variables, view))
  return jax.export.export(function, platforms=platforms())(spec)


def save(directory: str | pathlib.Path, model, variables: Any, view: transforms.EvalView,
         class_names: Sequence[str], image_shape: Sequence[int]) -> pathlib.Path:
  """Exports the model into ``directory`` (the artifact and its metadata); returns it."""
  directory = pathlib.Path(directory)
  exported = export_model(model, variables, view, image_shape)
  with files.atomic_open(directory / ARTIFACT, "wb") as f:
    f.write(exported.serialize())
  files.write_json(directory / METADATA, {
      "class_names": list(class_names),
      "input": {"shape": [None, *map(int, image_shape)], "dtype": "uint8"},
      "output": {"shape": [None, len(class_names)], "dtype": "float32",
                 "meaning": "class probabilities (softmax), in class_names order"},
      "preprocessing": view.describe(),
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
  })
  return directory


def load(directory: str | pathlib.Path) -> tuple[jax.export.Exported, dict]:
  """The exported function and its metadata, as :func:`save` wrote them."""
  directory = pathlib.Path(directory)
  exported = jax.export.deserialize(bytearray((directory / ARTIFACT).read_bytes()))
  return exported, json.loads((directory / METADATA).read_text())


def predict(directory: str | pathlib.Path, images: np.ndarray) -> np.ndarray:
  """Class probabilities [B, classes] of uint8 ``images`` from an exported model."""
  exported, _ = load(directory)
  return np.asarray(exported.call(np.asarray(images, np.uint8)))
