"""tljax.prefix: which layers a phase computes once, what it keeps of them, and whether the
caches fit."""

import jax
import jax.numpy as jnp
import pytest

from tljax import prefix
from tljax.models.layer_stack import Layer
from tljax.models.mobilenet_v2 import MobileNetV2

MODEL = MobileNetV2(alpha=0.35, include_top=True, num_classes=10)
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
