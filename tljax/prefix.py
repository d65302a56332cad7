"""Frozen-prefix caching: run the frozen bottom of the network once, train on its output.

When every layer before index ``cut`` is frozen (so its BatchNorm is in inference mode) and
the phase has no random augmentation, ``layers[:cut]`` is a fixed function of the input.
Its outputs that ``layers[cut:]`` read (the "frontier", residual inputs included) are
computed once per phase; the train step then starts at layer ``cut``.
"""

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tljax import sharding
from tljax.data import sources, transforms
from tljax.models import microbatch
from tljax.models.layer_stack import Layer, LayerStack


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


def plan_caches(model: LayerStack, variables: Mapping[str, Any], *, cut: int, next_cut: int,
                examples: int, input_size: int, max_gb: float) -> tuple[int, int]:
  """``(cut, following)``: the cut a phase caches (0 where its cache of ``examples`` would
  exceed ``max_gb``, the config's ``cache_max_gb``), and the next phase's cut to cache in the
  same pass (0: none).

  The next phase's cache can come from this phase's pass where ``next_cut <= cut``: those
  layers are frozen (their BatchNorm on moving statistics) throughout this phase, so they
  compute the same function at the next phase's start. Both caches must fit.
  """
  if not cut:
    return 0, 0
  limit, size = max_gb * 2**30, input_size
  needed = examples * bytes_per_example(model, cut, variables, size)
  if needed > limit:
    logging.info("prefix cache of layers[:%d] would need %.1f GB > cache_max_gb; not caching",
                 cut, needed / 2**30)
    return 0, 0
  if not 0 < next_cut <= cut:
    return cut, 0
  together = needed + examples * bytes_per_example(model, next_cut, variables, size)
  return cut, next_cut if together <= limit else 0


def build_prefix_caches(variables, source, *, model: LayerStack, cuts: tuple[int, ...],
                        view: transforms.EvalView, batch_size: int,
                        mesh) -> list[dict[str, jax.Array]]:
  """Runs ``layers[:max(cuts)]`` once over the images of ``source`` (a ``data.sources``
  source) in ``view``, ``batch_size`` at a time; returns each cut's frontier on device."""
  n = len(source)
  frontiers = [frontier(model.layers, cut) for cut in cuts]
  names = tuple(dict.fromkeys(name for frontier in frontiers for name in frontier))

  @jax.jit
  def extract(variables, inputs, indices):
    x = view(inputs["images"][indices])
    return microbatch.inference(model, variables, x, pixels=view.size**2, stop=max(cuts),
                                capture=names)

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def concatenate(chunks):
    return {name: jnp.concatenate([c[name] for c in chunks])[:n] for name in names}

  batches = source.eval_batches(batch_size)
  cache = concatenate([extract(variables, inputs, indices) for inputs, _, indices, _ in batches])
  return [{name: cache[name] for name in names_of} for names_of in frontiers]


class PhaseSources(NamedTuple):
  """The sources a phase reads (``data.sources`` sources): the images of its splits, or the
  caches of its frozen prefix."""
  train: Any
  validation: Any


class PhaseInputs(NamedTuple):
  """What a phase's steps read, as ``phase_inputs`` decided it."""
  cut: int                # The first layer they run: layers[:cut] are cached (0: none).
  sources: PhaseSources
  handed_over: bool       # The cache was built in the previous phase's pass.


def phase_inputs(phase, next_cut: int, variables, model: LayerStack, view: transforms.EvalView,
                 mesh, split_sources: PhaseSources, handoff: dict, *, cache_max_gb: float,
                 batch_size: int) -> PhaseInputs:
  """The cut ``phase`` caches and the sources its steps read: the images (cut 0, where its
  ``cacheable_cut`` is 0 or its cache would exceed ``cache_max_gb``), or its frozen prefix's
  cache on the device, built here ``batch_size`` images at a time or taken from ``handoff``
  where the previous phase built it. One pass over the images also caches the next phase's
  prefix (``next_cut``) where both fit, into ``handoff``."""
  cacheable = phase.cacheable_cut
  if (phase.index, cacheable) in handoff:
    logging.info("phase %s: using the cache of layers[:%d] built with the previous phase's",
                 phase.name, cacheable)
    return PhaseInputs(cacheable, handoff.pop((phase.index, cacheable)), True)
  cut, following = plan_caches(model, variables, cut=cacheable, next_cut=next_cut,
                               examples=sum(len(source) for source in split_sources),
                               input_size=view.size, max_gb=cache_max_gb)
  if not cut:
    return PhaseInputs(0, split_sources, False)
  cuts = (cut, following) if following else (cut,)
  logging.info("phase %s: caching layers[:%d]%s", phase.name, cut,
               f" and, for the next phase, layers[:{following}]" if following else "")
  t0 = time.perf_counter()
  built = [build_prefix_caches(variables, source, model=model, cuts=cuts, view=view,
                               batch_size=batch_size, mesh=mesh)
           if len(source) else None for source in split_sources]
  jax.block_until_ready([b for b in built if b is not None])
  # Per split, a source per cut: its cache on the device, or the split itself where empty.
  per_split = [[sources.DeviceSource(cache, source.labels, mesh) for cache in caches]
               if caches is not None else [source] * len(cuts)
               for source, caches in zip(split_sources, built)]
  per_cut = [PhaseSources(*of_cut) for of_cut in zip(*per_split)]
  if following:
    handoff[phase.index + 1, following] = per_cut[1]
  logging.info("phase %s: prefix cache built in %.1f s", phase.name, time.perf_counter() - t0)
  return PhaseInputs(cut, per_cut[0], False)
