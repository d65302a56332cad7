"""Tests of tljax.models.mobilenet_v2 against keras.applications.MobileNetV2 (the reference).

Keras models get random weights, BatchNorm moving statistics included, saved in the legacy .h5
layout; tljax loads them through ``weights.load_keras_h5`` and must compute the same features.
"""

import contextlib
import dataclasses
import functools
import gzip
import pathlib

import h5py
import jax
import jax.numpy as jnp
import keras  # A test dependency (the [test] extra): the reference must be there, never skipped.
import numpy as np
import pytest
from keras.src.initializers import random_initializers
from keras.src.legacy.saving import legacy_h5_format

from tljax.models import weights
from tljax.models import layer_stack, mobilenet_v2
from tljax.models.mobilenet_v2 import MobileNetV2

pytestmark = pytest.mark.filterwarnings(  # Keras's JAX backend, on every numpy conversion.
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# float32 rounding differs with the order of summation: |tljax - keras| <= 1e-4 * (1 + |keras|).
TOLERANCE = 1e-4
NUM_CLASSES = 10
# Intermediate features compared before the output, so that a mismatch is located.
FEATURES = ("block_2_add", "block_6_project_BN", "block_13_depthwise_relu", "out_relu")
# (alpha, (height, width), include_top): each value of each setting at least once.
CASES = [(0.35, (32, 32), True), (0.35, (96, 96), False), (1.0, (32, 48), True),
         (1.0, (96, 96), False)]


@dataclasses.dataclass(frozen=True)
class Reference:
  """A random Keras model, its weights as a legacy .h5 file, and its outputs on ``x``."""
  keras_model: object
  model: MobileNetV2
  path: pathlib.Path
  x: np.ndarray
  outputs: dict


def _randomise_batch_norm(keras_model, rng):
  """Moving statistics away from (0, 1) and a non-zero head bias, so a mix-up shows."""
  for layer in keras_model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.set_weights([1 + 0.1 * rng.standard_normal(n), 0.1 * rng.standard_normal(n),
                         0.1 * rng.standard_normal(n), 1 + 0.1 * np.abs(rng.standard_normal(n))])
    elif isinstance(layer, keras.layers.Dense):
      layer.bias.assign(0.1 * rng.standard_normal(layer.bias.shape))


@contextlib.contextmanager
def _numpy_initialisers(rng):
  """Keras draws initial weights from numpy: its JAX RNG compiles anew per shape (~0.4 s each)."""
  def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
    return rng.uniform(minval, maxval, shape).astype(dtype or np.float32)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(random_initializers.random, "uniform", uniform)
    yield


@pytest.fixture(scope="module", params=CASES,
                ids=[f"alpha{a}-{h}x{w}-{'top' if t else 'no_top'}" for a, (h, w), t in CASES])
def reference(request, tmp_path_factory):
  alpha, (height, width), include_top = request.param
  keras.backend.clear_session()  # Keras numbers unnamed layers per session.
  rng = np.random.default_rng(0)
  with _numpy_initialisers(rng):
    keras_model = keras.applications.MobileNetV2(
        input_shape=(height, width, 3), alpha=alpha, include_top=include_top, weights=None,
        classes=NUM_CLASSES, classifier_activation=None)
  _randomise_batch_norm(keras_model, rng)
  path = tmp_path_factory.mktemp("keras") / "weights.h5"
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
  names = FEATURES + (keras_model.layers[-1].name,) * include_top
  probe = keras.Model(keras_model.inputs, [keras_model.get_layer(n).output for n in names])
  x = rng.uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
  outputs = dict(zip(names, probe.predict(x, verbose=0)))
  model = MobileNetV2(alpha=alpha, include_top=include_top, num_classes=NUM_CLASSES)
  return Reference(keras_model, model, path, x, outputs)


def test_ported_weights_compute_what_keras_computes(reference):
  variables = weights.load_keras_h5(reference.path, reference.model)
  for impl in ("shifted", "xla"):
    model = reference.model.clone(depthwise=impl)
    apply = jax.jit(functools.partial(model.apply, capture=tuple(reference.outputs)))
    outputs = apply(variables, reference.x)
    for name, expected in reference.outputs.items():  # In network order: the first is to blame.
      assert outputs[name].shape == expected.shape, name
      np.testing.assert_allclose(outputs[name], expected, rtol=TOLERANCE, atol=TOLERANCE,
                                 err_msg=f"{name} differs from Keras ({impl} depthwise)")
  for name in FEATURES:  # The comparison is not between near-constant tensors.
    assert float(np.std(reference.outputs[name])) > 0.05, name


def test_layers_are_keras_layers(reference):
  keras_names = [layer.name for layer in reference.keras_model.layers]
  names = [layer.name for layer in reference.model.layers]
  assert names[1:] == keras_names[1:]  # The input layer's name differs between Keras versions.
  assert names[0] == layer_stack.INPUT_NAME


def test_parameter_counts_equal_keras(reference):
  model = reference.model
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  keras_trainable = sum(int(np.prod(w.shape)) for w in reference.keras_model.trainable_weights)
  assert count(shapes) == reference.keras_model.count_params()
  assert count(shapes["params"]) == keras_trainable


def test_keras_layer_indices():
  layers = mobilenet_v2.keras_layers()
  assert len(layers) == 154
  assert layers[100].name == "block_11_expand_relu"
  assert [l.name for l in mobilenet_v2.keras_layers(include_top=True)[-2:]] == [
      "global_average_pooling2d", "predictions"]


def _mnist_images(mnist_dir: pathlib.Path, count: int) -> np.ndarray:
  """The first ``count`` test digits, ``[count, 28, 28]`` uint8, from the IDX file."""
  with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz", "rb") as f:
    data = f.read(16 + count * 28 * 28)
  assert int.from_bytes(data[:4], "big") == 2051, "not an IDX image file"
  return np.frombuffer(data[16:], np.uint8).reshape(count, 28, 28)


def test_imagenet_features_of_mnist_digits_match_keras(imagenet_weights_path, mnist_dir):
  grey = jnp.asarray(_mnist_images(mnist_dir, 8), jnp.float32)
  rgb = jnp.repeat(grey[..., None], 3, axis=-1)
  x = jax.image.resize(rgb, (8, 96, 96, 3), "bilinear") / 127.5 - 1
  keras.backend.clear_session()
  with _numpy_initialisers(np.random.default_rng(0)):
    keras_model = keras.applications.MobileNetV2(weights=str(imagenet_weights_path),
                                                 include_top=False, input_shape=(96, 96, 3))
  expected = keras_model.predict(np.asarray(x), verbose=0)
  assert expected.shape == (8, 3, 3, 1280)
  assert float(np.std(expected)) > 0.1

  model = MobileNetV2(alpha=1.0, include_top=False)
  variables = weights.load_keras_h5(imagenet_weights_path, model)
  for impl in ("shifted", "xla"):
    features = jax.jit(model.clone(depthwise=impl).apply)(variables, x)
    np.testing.assert_allclose(features, expected, rtol=TOLERANCE, atol=TOLERANCE,
                               err_msg=f"{impl} depthwise")


@pytest.mark.parametrize("kernel_size, stride, channels_in, channels_out", [
    (1, 1, 8, 16), (1, 1, 16, 8), (3, 2, 8, 16), (3, 1, 8, 16), (1, 2, 8, 16),
    (3, 2, 3, 16), (3, 1, 3, 16)])  # Three channels: an image's patches times the kernel.
def test_keras_conv_equals_xla_convolution_with_gradients(kernel_size, stride, channels_in,
                                                          channels_out):
  """1x1 stride-1 convolutions and those of an image run as matrix products whose kernel
  gradient transposes the narrower of input and output gradient: same outputs and
  gradients."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 5, 6, channels_in), np.float32)
  kernel = rng.standard_normal((kernel_size, kernel_size, channels_in, channels_out),
                               np.float32)
  xla = functools.partial(jax.lax.conv_general_dilated, window_strides=(stride, stride),
                          padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = functools.partial(layer_stack.keras_conv, stride=stride)
  cotangent = rng.standard_normal(jax.eval_shape(xla, x, kernel).shape).astype(np.float32)
  results = []
  for conv in (ours, xla):
    out, vjp = jax.vjp(conv, x, kernel)
    results.append((out, *vjp(cotangent)))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Where Keras publishes the weights.


def test_keras_weights_url_is_the_keras_applications_address():
  from keras.src.applications import mobilenet_v2 as keras_mobilenet_v2
  assert mobilenet_v2.BASE_URL == keras_mobilenet_v2.BASE_WEIGHT_PATH
  url = lambda alpha, size, top: MobileNetV2(alpha=alpha).keras_weights_url(size, top)
  assert url(1.0, 224, False) == (
      "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
      "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
  assert url(0.35, 96, True).endswith(
      "/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96.h5")
  assert url(0.5, 128, False).endswith("_0.5_128_no_top.h5")


@pytest.mark.parametrize("alpha, rows", [(0.3, 224), (1.0, 100)])
def test_weights_file_name_rejects_unpublished_files(alpha, rows):
  with pytest.raises(ValueError, match=f"got alpha={alpha}, rows={rows}"):
    mobilenet_v2.weights_file_name(alpha, rows, include_top=False)


@pytest.mark.parametrize("input_size, rows", [
    (96, 96), (128, 128), (160, 160), (192, 192), (224, 224), (32, 224), (100, 224),
    (256, 224), ((96, 96), 96), ((96, 128), 224)])
def test_keras_rows_as_keras_applications_picks_them(input_size, rows):
  assert mobilenet_v2.keras_rows(input_size) == rows


@pytest.mark.parametrize("alpha", mobilenet_v2.ALPHAS)
def test_infer_alpha_from_convolution_widths(alpha):
  kernels = {layer.name: {"kernel": np.zeros((1, 1, 1, layer.features))}
             for layer in mobilenet_v2.keras_layers(alpha) if layer.kind == "conv"}
  assert mobilenet_v2.infer_alpha(kernels) == alpha
  assert mobilenet_v2.infer_alpha({"Conv1": {"kernel": np.zeros((3, 3, 3, 7))}}) is None
