"""The frozen base's pooled features of every image: what the audit compares and classifies.

The same pass the head phase caches (``prefix.build_prefix_caches`` up to the global pooling
layer), run with the pretrained weights over every split.
"""

from collections.abc import Mapping

import jax
import numpy as np

from tljax import prefix
from tljax.data import transforms
from tljax.models.layer_stack import LayerStack

POOLING_KINDS = ("gap", "gmp")


def pooling_cut(model: LayerStack) -> int:
  """The index just past the model's global pooling layer: ``layers[:cut]`` ends in the
  pooled features the classifier reads."""
  pooling = [i for i, layer in enumerate(model.layers) if layer.kind in POOLING_KINDS]
  if not pooling:
    raise ValueError(f"{type(model).__name__} has no global pooling layer "
                     f"(a layer of kind {POOLING_KINDS}) to take features from.")
  return pooling[-1] + 1


def pooled_features(variables, split_sources: Mapping[str, object], *, model: LayerStack,
                    view: transforms.EvalView, batch_size: int, mesh) -> dict[str, np.ndarray]:
  """float32 [N, D] pooled features of each split's images (``data.sources`` sources) in
  ``view``, ``batch_size`` images at a time."""
  cut = pooling_cut(model)
  name = model.layers[cut - 1].name
  features = {}
  for split, source in split_sources.items():
    if not len(source):
      features[split] = np.zeros((0, 0), np.float32)
      continue
    cache, = prefix.build_prefix_caches(variables, source, model=model, cuts=(cut,), view=view,
                                        batch_size=batch_size, mesh=mesh)
    features[split] = np.asarray(jax.device_get(cache[name]), np.float32)
  return features
