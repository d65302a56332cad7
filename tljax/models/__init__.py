"""Backbones: Keras applications as Flax layer stacks (the contract: ``layer_stack``).

``BACKBONES`` maps ``config.model.name`` to the module class; a new backbone is a file here
whose class subclasses ``layer_stack.LayerStack``, and one entry below.
"""

import jax.numpy as jnp

from tljax.models.layer_stack import LayerStack
from tljax.models.mobilenet_v2 import MobileNetV2

BACKBONES = {"mobilenet_v2": MobileNetV2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype: compute dtype.


def backbone(name: str) -> type:
  """The backbone class called ``name``; a ValueError lists the known names."""
  if name not in BACKBONES:
    raise ValueError(f"model.name={name!r} is not one of {sorted(BACKBONES)}.")
  return BACKBONES[name]


def create(model_config, num_classes: int, batch_shards: int = 1) -> LayerStack:
  """The backbone ``model_config`` names (``config.model``), with a ``num_classes`` head, for
  batches split over ``batch_shards`` devices."""
  return backbone(model_config.name).from_config(
      model_config, num_classes, dtype=DTYPES[model_config.dtype],
      depthwise=model_config.depthwise, batch_shards=batch_shards)
