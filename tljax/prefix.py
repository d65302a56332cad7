"""Frozen-prefix caching: run the frozen bottom of the network once, train on its output.

When every layer before index ``cut`` is frozen (so its BatchNorm is in inference mode) and
the phase has no random augmentation, ``layers[:cut]`` is a fixed function of the input.
Its outputs that ``layers[cut:]`` read (the "frontier", residual inputs included) are
computed once per phase; the train step then starts at layer ``cut``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.layer_stack import Layer


def first_trainable_layer(layers: Sequence[Layer], trainable: frozenset[str]) -> int:
  """Index of the first layer with a trainable parameter (``len(layers)`` if none)."""
  return next((i for i, layer in enumerate(layers) if layer.name in trainable), len(layers))


def frontier(layers: Sequence[Layer], cut: int) -> tuple[str, ...]:
  """Names of the tensors from ``layers[:cut]`` that ``layers[cut:]`` read, in layer order.

  Example: in MobileNetV2 with ``cut`` at ``block_11_depthwise`` the frontier is
  ``("block_10_project_BN", "block_11_expand_relu")``: block 11's residual input and the
  depthwise convolution's input.
  """
  before = {layer.name for layer in layers[:cut]}
  read = {name for layer in layers[cut:] for name in layer.inputs if name in before}
  return tuple(layer.name for layer in layers[:cut] if layer.name in read)


def bytes_per_example(model, cut: int, variables: Mapping[str, Any], input_size: int) -> int:
  """Device bytes the cache of ``layers[:cut]`` holds per example: its frontier's outputs."""
  names = frontier(model.layers, cut)
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda v, x: model.apply(v, x, stop=cut, capture=names),
                          dict(variables), x)
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
