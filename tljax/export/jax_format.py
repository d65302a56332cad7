"""``model.jax_exported``: the whole inference function through ``jax.export``.

The artifact holds the evaluation view, the trained weights, the model and a softmax, uint8
images in and class probabilities out, for a symbolic batch size. Another program loads it
with nothing but ``jax`` and ``numpy``::

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
from tljax.export import contract

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


def write(directory: pathlib.Path, model, variables: Any, view: transforms.EvalView,
          image_shape: Sequence[int]) -> dict[str, Any]:
  """Writes ``directory/ARTIFACT``; returns what ``model.json`` records of it."""
  exported = export_model(model, variables, view, image_shape)
  with files.atomic_open(directory / ARTIFACT, "wb") as f:
    f.write(exported.serialize())
  return {"platforms": list(exported.platforms), "jax_version": jax.__version__}


def save(directory: str | pathlib.Path, model, variables: Any, view: transforms.EvalView,
         class_names: Sequence[str], image_shape: Sequence[int]) -> pathlib.Path:
  """Exports the jax artifact and ``model.json`` into ``directory``; returns it. (All the
  formats, checked: ``tljax.export.write``.)"""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  written = write(directory, model, variables, view, image_shape)
  files.write_json(directory / METADATA, {
      **contract.metadata(class_names, image_shape, view), **written})
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
