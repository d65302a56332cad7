"""MobileNetV2 as a Flax module that computes what ``keras.applications.MobileNetV2`` computes.

The network is described once, as the list of Keras layers in ``model.layers`` order
(``keras_layers``), and run by :class:`tljax.models.layer_stack.LayerStack`: every parameter
lives under its Keras layer name (``block_11_expand/kernel``, ``block_11_expand_BN/scale``;
BatchNorm statistics in ``batch_stats``), and any slice of the network runs on its own. Also
here: where Keras publishes the ImageNet weights for each width and input size, and the
freeze presets in this network's layer names.

Outputs are logits: the ``predictions`` layer has no softmax (Keras applies one by default).
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from tljax.models.layer_stack import INPUT_NAME, Layer, LayerStack

ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
POOLINGS = (None, "avg", "max")
MIN_INPUT_SIZE = 32
BN_MOMENTUM = 0.999
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
KERAS_ROWS = (96, 128, 160, 192, 224)  # Input sizes Keras publishes weights for.

# (expansion, output filters, stride) of the 17 inverted residual blocks, as in Keras.
_BLOCKS = ((1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 32, 1),
           (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1), (6, 96, 1), (6, 96, 1),
           (6, 96, 1), (6, 160, 2), (6, 160, 1), (6, 160, 1), (6, 320, 1))


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


def keras_rows(input_size: int | tuple[int, int]) -> int:
  """The input size whose Keras weights serve ``input_size``: itself if published, else 224."""
  rows, cols = (input_size, input_size) if isinstance(input_size, int) else input_size
  return rows if rows == cols and rows in KERAS_ROWS else 224


def weights_file_name(alpha: float, rows: int, include_top: bool) -> str:
  """The file name keras.applications uses, e.g. ``..._kernels_1.0_224_no_top.h5``."""
  if alpha not in ALPHAS or rows not in KERAS_ROWS:
    raise ValueError(f"Keras publishes MobileNetV2 weights for alpha in {ALPHAS} "
                     f"and rows in {KERAS_ROWS}; got alpha={alpha}, rows={rows}.")
  suffix = "" if include_top else "_no_top"
  return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}{suffix}.h5"


def infer_alpha(file_weights: Mapping[str, Mapping[str, np.ndarray]]) -> float | None:
  """The width multiplier whose convolution widths all match a weights file's, if any.

  Example: a file whose ``block_16_project`` kernel has 112 output channels is for alpha 0.35.
  """
  kernels = {layer: w["kernel"].shape for layer, w in file_weights.items() if "kernel" in w}
  for alpha in ALPHAS:
    widths = {l.name: l.features for l in keras_layers(alpha) if l.kind == "conv"}
    common = [name for name in widths if name in kernels]
    if common and all(kernels[name][-1] == widths[name] for name in common):
      return alpha
  return None


class MobileNetV2(LayerStack):
  """``keras.applications.MobileNetV2`` in Flax; returns logits when ``include_top``.

  Attributes (besides LayerStack's):
    alpha: width multiplier, one of ``ALPHAS``.
    include_top: add global average pooling and the ``predictions`` dense layer.
    pooling: without a top, None (feature map), "avg" or "max".
  """
  alpha: float = 1.0
  include_top: bool = True
  pooling: str | None = None
  bn_momentum: float = BN_MOMENTUM

  MIN_INPUT_SIZE: ClassVar[int] = MIN_INPUT_SIZE
  # The four classic transfer-learning situations (dataset size, and how close its images
  # are to ImageNet), as a phase's rules: ("preset:small_similar",).
  PRESETS: ClassVar[Mapping[str, tuple[str, ...]]] = {
      # Few examples, ImageNet-like images: the features fit; train only the new head.
      "small_similar": ("train:predictions/.*", "freeze:.*"),
      # Few examples, unlike ImageNet: keep the generic lower layers (edges, textures) and
      # adapt the task-specific top: the tutorial's layers[:100], from block 11 on.
      "small_different": ("freeze:layers[:block_11_expand_relu]", "train:.*"),
      # Many examples, ImageNet-like: fine-tune all but the stem and the first blocks.
      "large_similar": ("freeze:layers[:block_4_expand]", "train:.*"),
      # Many examples, unlike ImageNet: fine-tune everything; ImageNet is the initialisation.
      "large_different": ("train:.*",),
  }

  @property
  def layers(self) -> tuple[Layer, ...]:
    return keras_layers(self.alpha, self.include_top, self.pooling)

  @property
  def base_layers(self) -> tuple[Layer, ...]:
    return keras_layers(self.alpha, include_top=False)

  @staticmethod
  def check_config(model_config: Any) -> None:
    """Raises ValueError naming a ``model`` setting this backbone cannot take."""
    if model_config.alpha not in ALPHAS:
      raise ValueError(f"model.alpha={model_config.alpha} is not one of {ALPHAS}.")
    if model_config.input_size < MIN_INPUT_SIZE:
      raise ValueError(f"model.input_size={model_config.input_size} is below MobileNetV2's "
                       f"minimum of {MIN_INPUT_SIZE}.")

  @classmethod
  def from_config(cls, model_config: Any, num_classes: int, **kwargs) -> "MobileNetV2":
    """The classifier for ``model_config`` (alpha, bn_momentum) and ``num_classes``;
    ``kwargs`` set the other LayerStack attributes (dtype, depthwise, batch_shards)."""
    cls.check_config(model_config)
    return cls(alpha=model_config.alpha, include_top=True, num_classes=num_classes,
               bn_momentum=model_config.bn_momentum, **kwargs)

  def keras_weights_url(self, input_size: int | tuple[int, int], include_top: bool) -> str:
    """The address keras.applications downloads the ImageNet weights for ``input_size``
    from: its own size where Keras publishes one (96, 128, 160, 192, 224), else 224."""
    return BASE_URL + weights_file_name(self.alpha, keras_rows(input_size), include_top)

  def weights_hints(self, file_weights: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
    """What to change when a weights file does not fit this model's width."""
    file_alpha = infer_alpha(file_weights)
    if file_alpha is None or file_alpha == self.alpha:
      return []
    return [f"the file is for alpha={file_alpha}; set model.alpha={file_alpha} to match, or "
            f"use the file for alpha={self.alpha}."]
