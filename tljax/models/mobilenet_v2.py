"""MobileNetV2 as a Flax module that computes what ``keras.applications.MobileNetV2`` computes.

The network is described once, as the list of Keras layers in ``model.layers`` order
(``keras_layers``). The module executes that list, so

* every parameter lives under its Keras layer name (``block_11_expand/kernel``,
  ``block_11_expand_BN/scale``; BatchNorm statistics in ``batch_stats``), which makes the weight
  port a plain mapping and lets freeze rules address ``layers[:100]`` as Keras does;
* any slice of the network can run on its own: ``stop`` ends early and ``capture`` returns the
  named intermediate tensors; ``start`` resumes from such a dict. That is how a frozen prefix is
  computed once and cached.

With ``fold_bn``, a BatchNorm layer that uses its moving statistics is folded into the
convolution before it: the kernel is scaled by ``scale / sqrt(var + eps)`` and one bias is
added, which is the same function (to float32 rounding) in one pass over the activations
instead of two. Gradients reach the BatchNorm's ``scale`` and ``bias`` through the fold.

Outputs are logits: the ``predictions`` layer has no softmax (Keras applies one by default).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models import depthwise
from tljax.models.batch_norm import BatchNorm

ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
POOLINGS = (None, "avg", "max")
MIN_INPUT_SIZE = 32
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.999
INPUT_NAME = "input_layer"
CONVOLUTIONS = ("conv", "depthwise")  # Layer kinds that convolve.

# (expansion, output filters, stride) of the 17 inverted residual blocks, as in Keras.
_BLOCKS = ((1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 32, 1),
           (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1), (6, 96, 1), (6, 96, 1),
           (6, 96, 1), (6, 160, 2), (6, 160, 1), (6, 160, 1), (6, 320, 1))


@dataclasses.dataclass(frozen=True)
class Layer:
  """One Keras layer: its name, what it does, the layers it reads, and its static settings."""
  name: str
  kind: str  # input, conv, bn, relu6, pad, depthwise, add, gap, gmp, dense
  inputs: tuple[str, ...] = ()
  features: int = 0
  kernel_size: int = 1
  stride: int = 1


def make_divisible(value: float, divisor: int = 8) -> int:
  """Keras's channel rounding: nearest multiple of ``divisor``, never more than 10% down."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def keras_layers(alpha: float = 1.0, include_top: bool = False,
                 pooling: str | None = None) -> tuple[Layer, ...]:
  """The layers of ``keras.applications.MobileNetV2(alpha, include_top, pooling)``, in order.

  Example: ``keras_layers()[100].name == "block_11_expand_relu"``.
  """
  if alpha not in ALPHAS:
    raise ValueError(f"MobileNetV2 alpha={alpha!r} is not one of {ALPHAS} "
                     "(the widths Keras publishes ImageNet weights for).")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}.")
  layers = [Layer(INPUT_NAME, "input")]

  def add(name, kind, inputs=None, **settings):
    layers.append(Layer(name, kind, inputs or (layers[-1].name,), **settings))

  def conv_bn(conv_name, bn_name, features, kernel_size=1, stride=1):
    add(conv_name, "conv", features=features, kernel_size=kernel_size, stride=stride)
    add(bn_name, "bn")

  channels = make_divisible(32 * alpha)
  conv_bn("Conv1", "bn_Conv1", channels, kernel_size=3, stride=2)
  add("Conv1_relu", "relu6")
  for block_id, (expansion, filters, stride) in enumerate(_BLOCKS):
    block_input = layers[-1].name
    out_channels = make_divisible(int(filters * alpha))
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    if block_id:
      conv_bn(f"{prefix}expand", f"{prefix}expand_BN", expansion * channels)
      add(f"{prefix}expand_relu", "relu6")
    if stride == 2:
      add(f"{prefix}pad", "pad")
    add(f"{prefix}depthwise", "depthwise", kernel_size=3, stride=stride)
    add(f"{prefix}depthwise_BN", "bn")
    add(f"{prefix}depthwise_relu", "relu6")
    conv_bn(f"{prefix}project", f"{prefix}project_BN", out_channels)
    if channels == out_channels and stride == 1:
      add(f"{prefix}add", "add", inputs=(block_input, layers[-1].name))
    channels = out_channels
  last_channels = make_divisible(1280 * alpha) if alpha > 1.0 else 1280
  conv_bn("Conv_1", "Conv_1_bn", last_channels)
  add("out_relu", "relu6")
  if include_top or pooling == "avg":
    add("global_average_pooling2d", "gap")
  elif pooling == "max":
    add("global_max_pooling2d", "gmp")
  if include_top:
    add("predictions", "dense")
  return tuple(layers)


def layer_index(layers: Sequence[Layer], name: str) -> int:
  """Position of the layer called ``name``; a clear error lists similar names when absent."""
  for i, layer in enumerate(layers):
    if layer.name == name:
      return i
  near = [l.name for l in layers if name.split("_")[0] in l.name][:8]
  raise KeyError(f"MobileNetV2 has no layer named {name!r}; similar names: {near}")


def keras_pad(size_hw: tuple[int, int], kernel_size: int = 3) -> tuple[tuple[int, int], ...]:
  """Keras's ``imagenet_utils.correct_pad``: zero padding before a stride-2 'valid' conv."""
  half = kernel_size // 2
  return tuple((half - (1 - s % 2), half) for s in size_hw)


class Conv2D(nn.Module):
  """Keras's Conv2D as MobileNetV2 uses it: no bias, 'SAME' padding."""
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


def keras_conv(x_NHWC: jax.Array, kernel_HWIO: jax.Array, stride: int) -> jax.Array:
  """A Keras MobileNetV2 convolution. The 1x1 ones (all but the stem) are matrix products over
  the channels: as ``dot_general`` their gradients need no transposed copy of the kernel,
  which XLA:CPU makes for a convolution's."""
  if kernel_HWIO.shape[:2] == (1, 1) and stride == 1:
    return jax.lax.dot_general(x_NHWC, kernel_HWIO[0, 0], (((3,), (0,)), ((), ())))
  return jax.lax.conv_general_dilated(x_NHWC, kernel_HWIO, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


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


def keras_depthwise(x_NHWC: jax.Array, kernel_HWC1: jax.Array, stride: int,
                    impl: str) -> jax.Array:
  """The depthwise convolution of a Keras MobileNetV2 layer: 'SAME' at stride 1; at stride 2
  'VALID', since the ``pad`` layer before it has padded the input already."""
  return depthwise.depthwise_conv(x_NHWC, kernel_HWC1, stride=stride,
                                  padding="SAME" if stride == 1 else "VALID", impl=impl)


class MobileNetV2(nn.Module):
  """``keras.applications.MobileNetV2`` in Flax; returns logits when ``include_top``.

  Attributes:
    alpha: width multiplier, one of ``ALPHAS``.
    include_top: add global average pooling and the ``predictions`` dense layer.
    num_classes: outputs of ``predictions``.
    pooling: without a top, None (feature map), "avg" or "max".
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    depthwise: "auto", "shifted" or "xla" (see ``tljax.models.depthwise``).
    bn_momentum: moving-average momentum of BatchNorm layers in batch-statistics mode.
    fold_bn: fold moving-statistics BatchNorm into the preceding convolution (see above).
  """
  alpha: float = 1.0
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  dtype: Any = jnp.float32
  depthwise: str = "auto"
  bn_momentum: float = BN_MOMENTUM
  fold_bn: bool = False

  @property
  def layers(self) -> tuple[Layer, ...]:
    return keras_layers(self.alpha, self.include_top, self.pooling)

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
      _check_input(x)
      tensors = {INPUT_NAME: x}
      start = 1
    else:
      tensors = dict(x)
    folds = {}
    if self.fold_bn and not self.is_initializing():
      folds = _foldable(layers[start:stop], train_bn, capture)
    for layer in layers[start:stop]:
      inputs = [tensors[n] for n in layer.inputs]
      if layer.name in folds:
        tensors[layer.name] = self._folded_conv(layer, folds[layer.name], inputs[0])
      elif layer.kind == "bn" and layer.inputs[0] in folds:
        tensors[layer.name] = inputs[0]  # Applied by the convolution before it.
      else:
        tensors[layer.name] = self._apply_layer(layer, inputs, layer.name in train_bn)
    if capture:
      return {name: tensors[name] for name in capture}
    return tensors[layers[stop - 1].name]

  def _folded_conv(self, layer: Layer, bn_name: str, x: jax.Array) -> jax.Array:
    """``layer`` (conv or depthwise) followed by the moving-statistics BatchNorm ``bn_name``."""
    params = self.variables["params"]
    stats = self.variables["batch_stats"][bn_name]
    scale = params[bn_name]["scale"] * jax.lax.rsqrt(stats["var"] + BN_EPSILON)
    bias = params[bn_name]["bias"] - stats["mean"] * scale
    x = x.astype(self.dtype)
    if layer.kind == "conv":
      kernel = (params[layer.name]["kernel"] * scale).astype(self.dtype)
      y = keras_conv(x, kernel, layer.stride)
    else:
      kernel = (params[layer.name]["depthwise_kernel"] * scale[:, None]).astype(self.dtype)
      y = keras_depthwise(x, kernel, layer.stride, self.depthwise)
    return y + bias.astype(self.dtype)

  def _apply_layer(self, layer: Layer, inputs: list[jax.Array], train_bn: bool) -> jax.Array:
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


def _foldable(layers: Sequence[Layer], train_bn: frozenset[str],
              capture: Sequence[str]) -> dict[str, str]:
  """``conv name -> BatchNorm name`` for the pairs in ``layers`` that can be folded: the
  BatchNorm uses moving statistics and is the only reader of a convolution whose own output
  is not captured."""
  readers: dict[str, list[Layer]] = {}
  for layer in layers:
    for name in layer.inputs:
      readers.setdefault(name, []).append(layer)
  return {layer.name: only.name for layer in layers
          if layer.kind in CONVOLUTIONS and layer.name not in capture
          and len(readers.get(layer.name, ())) == 1
          and (only := readers[layer.name][0]).kind == "bn" and only.name not in train_bn}


def _check_input(x: Any) -> None:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"MobileNetV2 expects images shaped [batch, height, width, 3]; got "
                     f"{shape}. Convert grey images to 3 channels first.")
  if min(shape[1:3]) < MIN_INPUT_SIZE:
    raise ValueError(f"MobileNetV2 input {shape[1]}x{shape[2]} is smaller than the "
                     f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} Keras allows; resize the images "
                     "(config key model.input_size).")
