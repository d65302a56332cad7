"""tljax.prefix: which layers a phase computes once, what it keeps of them, whether the caches
fit, and the cut a phase's steps then start at."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import MODEL
from tljax import prefix, sharding
from tljax.data import sources, transforms
from tljax.models.layer_stack import Layer

VARIABLES = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
# A residual block: c's input is b, and d adds a (the block's input) to c.
CHAIN = (Layer("a", "input"), Layer("b", "conv", ("a",)), Layer("c", "bn", ("b",)),
         Layer("d", "add", ("a", "c")))


@pytest.mark.parametrize("cut, frontier", [(1, ("a",)), (2, ("a", "b")), (3, ("a", "c"))])
def test_frontier_keeps_every_tensor_read_past_the_cut(cut, frontier):
  assert prefix.frontier(CHAIN, cut) == frontier


def test_first_trainable_layer():
  assert prefix.first_trainable_layer(CHAIN, frozenset({"c", "b"})) == 1
  assert prefix.first_trainable_layer(CHAIN, frozenset()) == len(CHAIN)


def test_bytes_per_example_is_the_frontiers_size():
  names = [layer.name for layer in MODEL.layers]
  cut = names.index("block_11_depthwise")
  assert prefix.frontier(MODEL.layers, cut) == ("block_10_project_BN", "block_11_expand_relu")
  # At 32x32 both are 2x2 maps: 32 (alpha 0.35 of 96) and 192 channels, float32.
  assert prefix.bytes_per_example(MODEL, cut, VARIABLES, 32) == 2 * 2 * (32 + 192) * 4


@pytest.mark.parametrize("cache_max_gb, next_cut, expected", [
    (1.0, 0, (60, 0)), (1.0, 30, (60, 30)), (1.0, 80, (60, 0)),   # The next cut must be <= this.
    (1e-9, 30, (0, 0)),                                           # Nothing fits.
])
def test_plan_caches(cache_max_gb, next_cut, expected):
  assert prefix.plan_caches(MODEL, VARIABLES, cut=60, next_cut=next_cut, examples=1000,
                            input_size=32, max_gb=cache_max_gb) == expected


def test_plan_caches_leaves_out_the_next_cache_when_both_do_not_fit():
  per_example = prefix.bytes_per_example(MODEL, 60, VARIABLES, 32)
  assert prefix.plan_caches(MODEL, VARIABLES, cut=60, next_cut=30, examples=1000, input_size=32,
                            max_gb=1.5 * per_example * 1000 / 2**30) == (60, 0)


# phase_inputs, on a prefix cheap to compile: the first layers of the network.
MESH = sharding.data_mesh(jax.devices()[:1])
VIEW = transforms.EvalView(size=32, scale="unit")


def _phase(index, cacheable_cut):
  return types.SimpleNamespace(index=index, name=f"phase{index}", cacheable_cut=cacheable_cut)


@pytest.fixture(scope="module")
def images():
  """``(variables, PhaseSources)``: 6 training and 4 validation images on the device."""
  rng = np.random.default_rng(0)
  variables = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  split = [sources.DeviceSource({"images": jnp.asarray(rng.integers(0, 255, (n, 28, 28),
                                                                    dtype=np.uint8))},
                                jnp.arange(n, dtype=jnp.int32), MESH) for n in (6, 4)]
  return variables, prefix.PhaseSources(*split)


def _inputs(phase, next_cut, images, handoff, cache_max_gb=1.0):
  variables, split_sources = images
  return prefix.phase_inputs(phase, next_cut, variables, MODEL, VIEW, MESH, split_sources,
                             handoff, cache_max_gb=cache_max_gb, batch_size=4)


def test_phase_inputs_caches_the_cut_and_hands_the_next_phase_its_own(images):
  handoff = {}
  first = _inputs(_phase(0, 6), 3, images, handoff)
  assert (first.cut, first.handed_over) == (6, False)
  assert set(first.sources.train.inputs) == set(prefix.frontier(MODEL.layers, 6))
  assert len(first.sources.train) == 6 and len(first.sources.validation) == 4
  assert list(handoff) == [(1, 3)]  # Built in the same pass.
  handed = handoff[1, 3]
  second = _inputs(_phase(1, 3), 0, images, handoff)
  assert second == (3, handed, True) and not handoff
  assert set(second.sources.validation.inputs) == set(prefix.frontier(MODEL.layers, 3))


@pytest.mark.parametrize("cacheable_cut, cache_max_gb", [(0, 1.0), (6, 1e-9)])
def test_phase_inputs_without_a_cache_run_from_the_images(images, cacheable_cut, cache_max_gb):
  handoff = {}
  inputs = _inputs(_phase(0, cacheable_cut), 3, images, handoff, cache_max_gb)
  assert inputs == (0, images[1], False) and not handoff
