"""The frozen base's pooled features of every image: what the audit compares and classifies.

The same pass the head phase caches (``prefix.build_prefix_caches`` up to the global pooling
layer), run with the pretrained weights over every split at once.
"""

from collections.abc import Mapping

import jax
import numpy as np

from tljax import prefix
from tljax.data import sources, transforms
from tljax.data.dataset import RowView, Split
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


def joined(splits: Mapping[str, Split]) -> Split:
  """The examples of every split, one split after the other: one pass (one compilation)
  instead of one a split. The rows of a streamed dataset's splits are of one decoded cache."""
  images = [s.images for s in splits.values()]
  labels = np.concatenate([s.labels for s in splits.values()])
  if isinstance(images[0], RowView):
    return Split(RowView(images[0].source, np.concatenate([i.rows for i in images])), labels)
  return Split(np.concatenate(images), labels)


def pooled_features(variables, splits: Mapping[str, Split], *, model: LayerStack,
                    view: transforms.EvalView, batch_size: int, mesh) -> dict[str, np.ndarray]:
  """float32 [N, D] pooled features of each split's images in ``view``, ``batch_size``
  images at a time."""
  cut = pooling_cut(model)
  source = sources.sources({"all": joined(splits)}, mesh)["all"]
  cache, = prefix.build_prefix_caches(variables, source, model=model, cuts=(cut,), view=view,
                                      batch_size=batch_size, mesh=mesh)
  features = np.asarray(jax.device_get(cache[model.layers[cut - 1].name]), np.float32)
  ends = np.cumsum([len(s) for s in splits.values()])
  return dict(zip(splits, np.split(features, ends[:-1])))
