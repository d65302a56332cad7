"""tljax.models.layer_stack: Keras's stride-2 padding, the 1x1 convolution as a matrix product
with its own gradient, and a LayerStack run whole or in slices on a six-layer toy backbone.

(The convolutions against XLA's and whole MobileNetV2 against Keras: test_mobilenet_v2.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models import layer_stack
from tljax.models.layer_stack import Layer, LayerStack


@pytest.mark.parametrize("size_hw, kernel_size, expected", [
    ((32, 32), 3, ((0, 1), (0, 1))), ((33, 33), 3, ((1, 1), (1, 1))),
    ((16, 15), 3, ((0, 1), (1, 1))), ((32, 32), 5, ((1, 2), (1, 2))),
])
def test_keras_pad_is_keras_correct_pad(size_hw, kernel_size, expected):
  assert layer_stack.keras_pad(size_hw, kernel_size) == expected


def _integers(shape, seed):
  """Small integer values as float32: every sum of products is exact."""
  return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape), jnp.float32)


@pytest.mark.parametrize("channels_in, channels_out", [(3, 8), (8, 3)],
                         ids=["input_narrower", "output_narrower"])
def test_pointwise_conv_and_its_gradients_are_the_einsum_ones(channels_in, channels_out):
  x, kernel = _integers((2, 5, 4, channels_in), 0), _integers((channels_in, channels_out), 1)
  cotangent = _integers((2, 5, 4, channels_out), 2)

  def loss(conv):
    return lambda x, k: jnp.sum(conv(x, k) * cotangent)

  einsum = lambda x, k: jnp.einsum("nhwi,io->nhwo", x, k)
  np.testing.assert_array_equal(layer_stack.pointwise_conv(x, kernel), einsum(x, kernel))
  got = jax.jit(jax.grad(loss(layer_stack.pointwise_conv), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(einsum), argnums=(0, 1))(x, kernel)
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_image_patches_hold_each_window_in_kernel_order():
  x = _integers((1, 6, 6, 2), 3)
  patches = layer_stack.image_patches(x, 3, 3, 2)
  assert patches.shape == (1, 3, 3, 9 * 2)
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # 'SAME' at stride 2: after only.
  np.testing.assert_array_equal(patches[0, 1, 2], padded[0, 2:5, 4:7].reshape(-1))


class Toy(LayerStack):
  """conv 3x3 -> BN -> relu6 -> a 1x1 conv added back -> pad -> depthwise stride 2 -> pool ->
  dense: every layer kind but gmp."""

  @property
  def layers(self):
    return (Layer("input_layer", "input"),
            Layer("Conv1", "conv", ("input_layer",), features=4, kernel_size=3),
            Layer("bn_Conv1", "bn", ("Conv1",)),
            Layer("Conv1_relu", "relu6", ("bn_Conv1",)),
            Layer("expand", "conv", ("Conv1_relu",), features=4),
            Layer("add", "add", ("Conv1_relu", "expand")),
            Layer("pad", "pad", ("add",)),
            Layer("depthwise", "depthwise", ("pad",), kernel_size=3, stride=2),
            Layer("pool", "gap", ("depthwise",)),
            Layer("predictions", "dense", ("pool",)))

  @property
  def base_layers(self):
    return self.layers[:-1]


MODEL = Toy(num_classes=5)
X = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
VARIABLES = jax.jit(MODEL.init)(jax.random.PRNGKey(0), X)


def test_a_layer_stack_names_its_parameters_after_its_layers():
  assert sorted(VARIABLES["params"]) == ["Conv1", "bn_Conv1", "depthwise", "expand",
                                         "predictions"]
  assert VARIABLES["params"]["depthwise"]["depthwise_kernel"].shape == (3, 3, 4, 1)
  assert VARIABLES["params"]["expand"]["kernel"].shape == (1, 1, 4, 4)
  assert sorted(VARIABLES["batch_stats"]["bn_Conv1"]) == ["mean", "var"]
  assert MODEL.apply(VARIABLES, X).shape == (2, 5)


def test_a_slice_started_from_captured_tensors_ends_as_the_whole_run():
  whole = MODEL.apply(VARIABLES, X)
  captured = MODEL.apply(VARIABLES, X, stop=6, capture=("add",))
  assert list(captured) == ["add"] and captured["add"].shape == (2, 32, 32, 4)
  np.testing.assert_array_equal(MODEL.apply(VARIABLES, captured, start=6), whole)
  inner = MODEL.apply(VARIABLES, X, capture=("pad", "pool"))
  assert inner["pad"].shape == (2, 33, 33, 4) and inner["pool"].shape == (2, 4)
  np.testing.assert_array_equal(MODEL.apply(VARIABLES, {"pool": inner["pool"]}, start=9), whole)


def test_only_named_batchnorms_use_and_update_batch_statistics():
  frozen, updates = MODEL.apply(VARIABLES, X, mutable=["batch_stats"])
  np.testing.assert_array_equal(frozen, MODEL.apply(VARIABLES, X))
  assert jax.tree.all(jax.tree.map(np.array_equal, updates["batch_stats"],
                                   VARIABLES["batch_stats"]))
  trained, updates = MODEL.apply(VARIABLES, X, train_bn=frozenset({"bn_Conv1"}),
                                 mutable=["batch_stats"])
  assert not np.allclose(trained, frozen)
  assert not np.allclose(updates["batch_stats"]["bn_Conv1"]["mean"], 0.0)


@pytest.mark.parametrize("shape, message", [
    ((2, 32, 32), r"Toy expects images shaped \[batch, height, width, 3\]; got \(2, 32, 32\)"),
    ((2, 32, 32, 1), r"got \(2, 32, 32, 1\). Convert grey images to 3 channels first."),
    ((2, 32, 31, 3), r"Toy input 32x31 is smaller than the 32x32 Keras allows"),
])
def test_bad_images_are_named(shape, message):
  with pytest.raises(ValueError, match=message):
    MODEL.apply(VARIABLES, np.zeros(shape, np.float32))


def test_an_unknown_layer_kind_is_named():
  with pytest.raises(ValueError, match="unknown layer kind 'swish' for layer 'act'"):
    MODEL.apply(VARIABLES, {"pool": np.zeros((2, 4), np.float32)}, start=9,
                method=lambda module, x, **k: module.apply_layer(
                    Layer("act", "swish", ("pool",)), [x["pool"]], False))
