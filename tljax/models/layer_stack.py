"""A Keras model as a list of layers, run by one Flax module: the contract every backbone keeps.

A backbone (``tljax/models/<name>.py``) subclasses :class:`LayerStack` and provides:

* ``layers``: its Keras layers in ``keras_model.layers`` order, head included when it has one
  (a :class:`Layer` each: name, kind, the layers it reads, static settings). Every parameter
  lives under its Keras layer name, so weights port by name and freeze rules read like the
  model (``block_11_.*``);
* ``base_layers``: the layers of the Keras application without its top, the list that a
  freeze rule's ``layers[a:b]`` indexes, as ``base_model.layers[a:b]`` does in Keras;
* ``PRESETS``: named freeze rules for the classic transfer-learning situations;
* ``check_config(model_config)``, raising ``ValueError`` naming a ``model`` setting it cannot
  take, and ``from_config(model_config, num_classes, **layer_stack_attributes)``;
* ``keras_weights_url(input_size, include_top)`` and ``weights_hints(file_weights)``: where
  Keras publishes its ImageNet weights, and what to say when a file does not fit.

:class:`LayerStack` runs any slice of the list (``start``, ``stop``, ``capture``), which is how
the trainer computes a frozen prefix once and trains from its cached output, and applies the
Keras layer kinds below. A kind a new backbone needs is one more branch of ``apply_layer``.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models import depthwise
from tljax.models.batch_norm import BatchNorm

INPUT_NAME = "input_layer"
CONVOLUTIONS = ("conv", "depthwise")  # Layer kinds that convolve.
IMAGE_CHANNELS = 4  # Convolutions of this few input channels run as matrix products.
BN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class Layer:
  """One Keras layer: its name, what it does, the layers it reads, and its static settings."""
  name: str
  kind: str  # input, conv, bn, relu6, pad, depthwise, add, gap, gmp, dense
  inputs: tuple[str, ...] = ()
  features: int = 0
  kernel_size: int = 1
  stride: int = 1


def keras_pad(size_hw: tuple[int, int], kernel_size: int = 3) -> tuple[tuple[int, int], ...]:
  """Keras's ``imagenet_utils.correct_pad``: zero padding before a stride-2 'valid' conv."""
  half = kernel_size // 2
  return tuple((half - (1 - s % 2), half) for s in size_hw)


def keras_conv(x_NHWC: jax.Array, kernel_HWIO: jax.Array, stride: int) -> jax.Array:
  """A bias-free 'SAME' Keras convolution.

  The 1x1 ones are matrix products over the channels (``pointwise_conv``): their gradients
  need no transposed copy of the kernel, which XLA:CPU makes for a convolution's. On the CPU
  in float32, so are those reading an image's few channels (the stem), over the stacked
  ``kh * kw`` shifted copies of the image: XLA:CPU's convolution of 3 channels runs far below
  its matrix product's rate, a large share of the forward pass at photo resolution
  (benchmarks/README.md). Elsewhere the backend's convolution is the better one, and in
  bfloat16 XLA:CPU's is the closer to float32.
  """
  kh, kw, channels_in, channels_out = kernel_HWIO.shape
  if (kh, kw) == (1, 1) and stride == 1:
    return pointwise_conv(x_NHWC, kernel_HWIO[0, 0])
  if (channels_in <= IMAGE_CHANNELS and x_NHWC.dtype == jnp.float32
      and jax.default_backend() == "cpu"):
    return pointwise_conv(image_patches(x_NHWC, kh, kw, stride),
                          kernel_HWIO.reshape(kh * kw * channels_in, channels_out))
  return jax.lax.conv_general_dilated(x_NHWC, kernel_HWIO, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def image_patches(x_NHWC: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
  """``[N, H', W', kh * kw * C]``: the input under each 'SAME' window, in ``HWIO`` kernel
  order (tap row, tap column, channel)."""
  return jnp.concatenate([window for _, window in depthwise.windows(
      x_NHWC, (kh, kw), stride, "SAME", every_tap=True)], axis=3)


@jax.custom_vjp
def pointwise_conv(x_NHWC: jax.Array, kernel_IO: jax.Array) -> jax.Array:
  """A 1x1 stride-1 convolution, ``x @ kernel`` over the channels.

  Its kernel gradient, ``x^T @ dy`` over every example and position, needs one operand with
  the positions as its minor axis. Left to itself XLA:CPU transposes the output gradient,
  often the wider, inside the fusion that computes it; here the narrower of the two is
  transposed, pinned by an optimization barrier (faster whole-network steps at photo
  resolution: benchmarks/README.md).
  """
  return jax.lax.dot_general(x_NHWC, kernel_IO, (((3,), (0,)), ((), ())))


def _pointwise_forward(x_NHWC, kernel_IO):
  return pointwise_conv(x_NHWC, kernel_IO), (x_NHWC, kernel_IO)


def _pointwise_backward(residuals, dy_NHWC):
  x_NHWC, kernel_IO = residuals
  dx = jax.lax.dot_general(dy_NHWC, kernel_IO, (((3,), (1,)), ((), ())))
  x_MI = x_NHWC.reshape(-1, x_NHWC.shape[-1])
  dy_MO = dy_NHWC.reshape(-1, dy_NHWC.shape[-1])
  if x_MI.shape[1] <= dy_MO.shape[1]:
    dkernel = jax.lax.optimization_barrier(x_MI.T) @ dy_MO
  else:
    dkernel = (jax.lax.optimization_barrier(dy_MO.T) @ x_MI).T
  return dx, dkernel.astype(kernel_IO.dtype)


pointwise_conv.defvjp(_pointwise_forward, _pointwise_backward)


def keras_depthwise(x_NHWC: jax.Array, kernel_HWC1: jax.Array, stride: int,
                    impl: str) -> jax.Array:
  """A Keras depthwise convolution as these models use it: 'SAME' at stride 1; at stride 2
  'VALID', since the ``pad`` layer before it has padded the input already."""
  return depthwise.depthwise_conv(x_NHWC, kernel_HWC1, stride=stride,
                                  padding="SAME" if stride == 1 else "VALID", impl=impl)


class Conv2D(nn.Module):
  """Keras's Conv2D without bias, 'SAME' padding."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.glorot_uniform(),
                        (self.kernel_size, self.kernel_size, x_NHWC.shape[-1], self.features),
                        jnp.float32)
    return keras_conv(x_NHWC.astype(self.dtype), kernel.astype(self.dtype), self.stride)


class DepthwiseConv2D(nn.Module):
  """Keras's DepthwiseConv2D (no bias, depth multiplier 1) with a selectable implementation."""
  kernel_size: int = 3
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    kernel = self.param("depthwise_kernel", nn.initializers.glorot_uniform(),
                        (self.kernel_size, self.kernel_size, x_NHWC.shape[-1], 1), jnp.float32)
    return keras_depthwise(x_NHWC.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                           self.impl)


class LayerStack(nn.Module):
  """Runs a backbone's ``layers``; returns logits (no softmax) when it ends in ``dense``.

  Attributes:
    num_classes: outputs of the ``dense`` head.
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    depthwise: "auto", "shifted" or "xla" (see ``tljax.models.depthwise``).
    bn_momentum: moving-average momentum of BatchNorm layers in batch-statistics mode.
    batch_shards: devices a batch is split over, so that work in micro-batches
      (``tljax.models.microbatch``) keeps each device on its own examples.
  """
  num_classes: int = 1000
  dtype: Any = jnp.float32
  depthwise: str = "auto"
  bn_momentum: float = 0.999
  batch_shards: int = 1

  MIN_INPUT_SIZE: ClassVar[int] = 32
  PRESETS: ClassVar[Mapping[str, tuple[str, ...]]] = {}

  @property
  def layers(self) -> tuple[Layer, ...]:
    raise NotImplementedError

  @property
  def base_layers(self) -> tuple[Layer, ...]:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array | Mapping[str, jax.Array], *,
               train_bn: frozenset[str] = frozenset(), start: int = 0, stop: int | None = None,
               capture: Sequence[str] = ()) -> jax.Array | dict[str, jax.Array]:
    """Runs ``layers[start:stop]``.

    Args:
      x: images ``[N, H, W, 3]`` when ``start == 0``, else a dict holding every tensor that
        ``layers[start:stop]`` reads from earlier layers (what ``capture`` returned).
      train_bn: names of BatchNorm layers that normalise with batch statistics and update
        their moving averages (needs ``mutable=["batch_stats"]``); all others use the moving
        statistics, as Keras does for ``training=False``.
      start, stop: the slice of ``self.layers`` to run.
      capture: layer names whose outputs to return, as a dict, instead of the last output.
    """
    layers = self.layers
    stop = len(layers) if stop is None else stop
    if start == 0:
      self._check_input(x)
      tensors = {INPUT_NAME: x}
      start = 1
    else:
      tensors = dict(x)
    for layer in layers[start:stop]:
      inputs = [tensors[n] for n in layer.inputs]
      tensors[layer.name] = self.apply_layer(layer, inputs, layer.name in train_bn)
    if capture:
      return {name: tensors[name] for name in capture}
    return tensors[layers[stop - 1].name]

  def apply_layer(self, layer: Layer, inputs: list[jax.Array], train_bn: bool) -> jax.Array:
    """One Keras layer of ``layer.kind`` on its inputs."""
    x = inputs[0]
    if layer.kind == "conv":
      return Conv2D(layer.features, layer.kernel_size, layer.stride, self.dtype,
                    name=layer.name)(x)
    if layer.kind == "bn":
      return BatchNorm(use_running_average=not train_bn, momentum=self.bn_momentum,
                       epsilon=BN_EPSILON, dtype=self.dtype, name=layer.name)(x)
    if layer.kind == "relu6":
      return jax.nn.relu6(x)  # Zero gradient at 0 and 6, as in Keras.
    if layer.kind == "pad":
      return jnp.pad(x, ((0, 0), *keras_pad(x.shape[1:3]), (0, 0)))
    if layer.kind == "depthwise":
      return DepthwiseConv2D(layer.kernel_size, layer.stride, self.depthwise, self.dtype,
                             name=layer.name)(x)
    if layer.kind == "add":
      return inputs[0] + inputs[1]
    if layer.kind == "gap":
      return jnp.mean(x, axis=(1, 2))
    if layer.kind == "gmp":
      return jnp.max(x, axis=(1, 2))
    if layer.kind == "dense":
      return nn.Dense(self.num_classes, dtype=self.dtype, name=layer.name,
                      kernel_init=nn.initializers.glorot_uniform())(x).astype(jnp.float32)
    raise ValueError(f"unknown layer kind {layer.kind!r} for layer {layer.name!r}")

  def _check_input(self, x: Any) -> None:
    name, size = type(self).__name__, self.MIN_INPUT_SIZE
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f"{name} expects images shaped [batch, height, width, 3]; got "
                       f"{shape}. Convert grey images to 3 channels first.")
    if min(shape[1:3]) < size:
      raise ValueError(f"{name} input {shape[1]}x{shape[2]} is smaller than the "
                       f"{size}x{size} Keras allows; resize the images "
                       "(config key model.input_size).")
