"""A model as the operations a deployment format has: what the ONNX and LiteRT writers translate.

:func:`build` reads a model only through the model contract (``tljax.models.layer_stack``):
its ``layers`` (name, kind, inputs, settings), the trained variables under the layer names,
and the evaluation view. It returns a :class:`Graph` of :class:`Op`, NHWC, in order:

* the evaluation view (``transforms.EvalView``): ``crop`` (the uint8 centre crop),
  ``cast`` (to float32), ``add_channel`` (grey ``[B, H, W]`` -> ``[B, H, W, 1]``),
  ``resize`` (bilinear, half-pixel centres, no antialiasing: ``jax.image.resize``'s),
  ``grey_to_rgb`` and ``scale`` (``x / divisor + offset``);
* one op per layer kind: ``conv`` (a convolution or depthwise convolution with the
  BatchNorm after it folded into its kernel and bias, the ReLU6 after that fused, and a
  zero ``pad`` before it folded into its padding), ``affine`` (a BatchNorm after anything
  else), ``relu6``, ``pad``, ``add``, ``mean`` and ``max`` (global pooling), ``dense``;
* ``softmax``: class probabilities.

Tensors are named after the layer whose output they are (a folded convolution's output after
the last layer folded into it), so calibration ranges found for one format serve another.
A layer kind not listed here is an :class:`ExportError` naming it: one more branch of
:func:`_layer_op` (and of each writer) exports a backbone that needs it.
"""

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tljax.data import transforms
from tljax.models import layer_stack

INPUT = "images"
OUTPUT = "probabilities"
PREPROCESSING = ("crop", "cast", "add_channel", "resize", "grey_to_rgb", "scale")
# Kept in float32 in int8 files: the classifier. Quantizing its logits to 8 bits flips the top
# class of images whose best two logits are close, for no speed (it is one small product).
FLOAT_HEAD = ("dense", "softmax")


class ExportError(ValueError):
  """A model or input that a deployment format cannot express; the message says which part."""


@dataclasses.dataclass
class Op:
  """One operation: ``kind``, the tensors it reads, the tensor it writes, its settings
  (shapes, weights as float32 NumPy arrays)."""
  kind: str
  inputs: tuple[str, ...]
  output: str
  attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Graph:
  """``ops`` from uint8 ``images [B, *image_shape]`` to float32 ``probabilities [B, classes]``;
  ``shapes`` holds every tensor's shape without the batch."""
  image_shape: tuple[int, ...]
  ops: list[Op]
  shapes: dict[str, tuple[int, ...]]
  num_classes: int


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """The (before, after) padding of 'SAME' along an axis of ``size``, as XLA and TF pad."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, pads: tuple[int, int]) -> int:
  return (size + sum(pads) - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# The evaluation view.


def _view_ops(view: transforms.EvalView, image_shape: Sequence[int],
              shapes: dict[str, tuple[int, ...]]) -> tuple[list[Op], str]:
  """The ops of ``view`` on uint8 images of ``image_shape``; the name of their output."""
  if len(image_shape) not in (2, 3) or (len(image_shape) == 3 and image_shape[2] not in (1, 3)):
    raise ExportError(f"images of shape {list(image_shape)}: the export takes [H, W] grey or "
                      "[H, W, 1 or 3] images.")
  ops, tensor = [], INPUT
  shapes[INPUT] = tuple(image_shape)

  def add(kind, shape, **attrs):
    nonlocal tensor
    output = f"view_{kind}"
    ops.append(Op(kind, (tensor,), output, attrs))
    shapes[output], tensor = tuple(shape), output

  h, w = image_shape[:2]
  if view.crop_fraction < 1.0:  # As transforms.evaluation_input crops.
    crop_h, crop_w = max(1, round(h * view.crop_fraction)), max(1, round(w * view.crop_fraction))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    h, w = crop_h, crop_w
    add("crop", (h, w, *image_shape[2:]), top=top, left=left, height=h, width=w)
  add("cast", shapes[tensor])
  if len(image_shape) == 2:
    add("add_channel", (h, w, 1))
  channels = shapes[tensor][2]
  if (h, w) != (view.size, view.size):
    add("resize", (view.size, view.size, channels), size=(view.size, view.size))
  if channels == 1:
    add("grey_to_rgb", (view.size, view.size, 3))
  divisor, offset = transforms.SCALES[view.scale]
  add("scale", (view.size, view.size, 3), divisor=divisor, offset=offset)
  return ops, tensor


# ---------------------------------------------------------------------------------------------
# The layers.


def _params(variables: Any, name: str) -> dict[str, np.ndarray]:
  params = dict(variables["params"].get(name, {}))
  params.update({f"stats_{k}": v for k, v in variables.get("batch_stats", {}).get(name, {}).items()})
  return {k: np.asarray(v, np.float32) for k, v in params.items()}


def _conv_op(layer: layer_stack.Layer, x: str, shape: tuple[int, ...],
             params: dict[str, np.ndarray]) -> tuple[Op, tuple[int, ...]]:
  h, w, c = shape
  k, s = layer.kernel_size, layer.stride
  if layer.kind == "conv":  # layer_stack.keras_conv: 'SAME'.
    kernel, groups, padding = params["kernel"], 1, "SAME"
  else:  # layer_stack.keras_depthwise: 'SAME' at stride 1, else 'VALID' (padded before).
    kernel, groups, padding = params["depthwise_kernel"], c, "SAME" if s == 1 else "VALID"
  pads = ((same_pads(h, k, s), same_pads(w, k, s)) if padding == "SAME" else ((0, 0), (0, 0)))
  out_c = kernel.shape[3] if groups == 1 else c
  op = Op("conv", (x,), layer.name, {"kernel": kernel, "bias": np.zeros(out_c, np.float32),
                                     "stride": s, "pads": pads, "groups": groups,
                                     "activation": None})
  out = (conv_output_size(h, k, s, pads[0]), conv_output_size(w, k, s, pads[1]), out_c)
  return op, out


def _bn_factors(params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """``(multiplier, shift)`` with ``bn(x) = x * multiplier + shift``, in float64, from
  Keras's ``(x - mean) * rsqrt(var + eps) * scale + bias``."""
  multiplier = params["scale"].astype(np.float64) / np.sqrt(
      params["stats_var"].astype(np.float64) + layer_stack.BN_EPSILON)
  return multiplier, params["bias"] - params["stats_mean"].astype(np.float64) * multiplier


def fold_affine(conv: Op, multiplier: np.ndarray, shift: np.ndarray) -> None:
  """``conv`` followed by ``x * multiplier + shift`` (per output channel) as one convolution:
  the kernel's output channels times ``multiplier``, the bias ``bias * multiplier + shift``."""
  kernel = conv.attrs["kernel"].astype(np.float64)
  # [kh, kw, in, out] has its output channel last; depthwise [kh, kw, channels, 1] third.
  conv.attrs["kernel"] = kernel * (multiplier if conv.attrs["groups"] == 1
                                   else multiplier[:, None])
  conv.attrs["bias"] = conv.attrs["bias"] * multiplier + shift


def _layer_op(layer: layer_stack.Layer, xs: list[str], shapes: dict[str, tuple[int, ...]],
              variables: Any) -> tuple[Op, tuple[int, ...]]:
  """The op of one layer, unfused, and its output shape."""
  shape = shapes[xs[0]]
  if layer.kind in layer_stack.CONVOLUTIONS:
    return _conv_op(layer, xs[0], shape, _params(variables, layer.name))
  if layer.kind == "bn":
    multiplier, shift = _bn_factors(_params(variables, layer.name))
    return Op("affine", (xs[0],), layer.name, {"multiplier": multiplier,
                                               "shift": shift}), shape
  if layer.kind == "relu6":
    return Op("relu6", (xs[0],), layer.name), shape
  if layer.kind == "pad":
    pads = layer_stack.keras_pad(shape[:2])
    out = (shape[0] + sum(pads[0]), shape[1] + sum(pads[1]), shape[2])
    return Op("pad", (xs[0],), layer.name, {"pads": pads}), out
  if layer.kind == "add":
    return Op("add", tuple(xs), layer.name), shape
  if layer.kind in ("gap", "gmp"):
    return Op("mean" if layer.kind == "gap" else "max", (xs[0],), layer.name), shape[-1:]
  if layer.kind == "dense":
    params = _params(variables, layer.name)
    return Op("dense", (xs[0],), layer.name, {"kernel": params["kernel"],
                                              "bias": params["bias"]}), params["bias"].shape
  raise ExportError(f"layer {layer.name!r} is of kind {layer.kind!r}, which the ONNX and "
                    "LiteRT export cannot write yet (add it to tljax/export/graph.py and the "
                    "writers).")


def _fuse(graph: Graph, op: Op, readers: Counter) -> bool:
  """Folds ``op`` into the op that writes its input where that is exact and the input has no
  other reader: a BatchNorm or ReLU6 after a convolution, a zero pad before one. True if
  it did."""
  producer = next((p for p in graph.ops if p.output == op.inputs[0]), None)
  if producer is None or producer.kind != "conv" or readers[op.inputs[0]] != 1:
    return False
  if op.kind == "affine" and producer.attrs["activation"] is None:
    fold_affine(producer, op.attrs["multiplier"], op.attrs["shift"])
    producer.output = op.output
    return True
  if op.kind == "relu6" and producer.attrs["activation"] is None:
    producer.attrs["activation"] = "relu6"
    producer.output = op.output
    return True
  return False


def _fold_pad(graph: Graph, conv: Op, readers: Counter) -> None:
  """A zero pad whose only reader is ``conv`` (Keras's ZeroPadding2D before a 'valid'
  convolution) becomes the convolution's own padding."""
  pad = next((p for p in graph.ops if p.output == conv.inputs[0]), None)
  if pad is None or pad.kind != "pad" or readers[pad.output] != 1:
    return
  conv.attrs["pads"] = tuple((a + c, b + d) for (a, b), (c, d)
                             in zip(conv.attrs["pads"], pad.attrs["pads"]))
  conv.inputs = pad.inputs
  graph.ops.remove(pad)


def build(model: layer_stack.LayerStack, variables: Any, view: transforms.EvalView,
          image_shape: Sequence[int]) -> Graph:
  """The graph of ``view``, ``model`` (with ``variables``) and a softmax for uint8 images of
  ``image_shape`` ([H, W] grey or [H, W, C]): what ``export.inference_function`` computes.
  ExportError names a layer kind or shape no format here can write."""
  variables = jax.device_get(variables)
  shapes: dict[str, tuple[int, ...]] = {}
  ops, x = _view_ops(view, image_shape, shapes)
  layers = model.layers
  readers = Counter(name for layer in layers for name in layer.inputs)
  graph = Graph(tuple(image_shape), ops, shapes, model.num_classes)
  names = {layer_stack.INPUT_NAME: x}  # Layer name -> the tensor holding its output.
  # A layer's op writes the tensor named after it, so ``readers`` counts a tensor's readers.
  for layer in layers[1:]:
    op, shape = _layer_op(layer, [names[n] for n in layer.inputs], shapes, variables)
    fused = op.kind in ("affine", "relu6") and _fuse(graph, op, readers)
    if op.kind == "conv":
      _fold_pad(graph, op, readers)
    if not fused:
      graph.ops.append(op)
    names[layer.name], shapes[op.output] = op.output, shape
  last = names[layers[-1].name]
  if shapes[last] != (model.num_classes,):
    raise ExportError(f"the model's last layer {layers[-1].name!r} gives shape "
                      f"{list(shapes[last])}, not [{model.num_classes}] class logits.")
  graph.ops.append(Op("softmax", (last,), OUTPUT))
  shapes[OUTPUT] = (model.num_classes,)
  for op in graph.ops:  # Folded in float64; every format holds float32 weights.
    op.attrs = {k: v.astype(np.float32) if isinstance(v, np.ndarray) else v
                for k, v in op.attrs.items()}
  return graph


def leading_stages(graph: Graph, stages: int) -> tuple[str, ...]:
  """The outputs of the layer ops that run at the network's first ``stages`` spatial
  resolutions, in order (the view, pooling and classifier never): what an int8 file may keep
  in float32. At a small input these early layers hold the detail that 8-bit activations lose
  first (docs/deploying.md, int8 at 32 px)."""
  outputs, sizes = [], []
  for op in graph.ops:
    shape = graph.shapes[op.output]
    if op.kind in PREPROCESSING:
      continue
    if len(shape) != 3:
      break
    if shape[:2] not in sizes:
      if len(sizes) == stages:
        break
      sizes.append(shape[:2])
    outputs.append(op.output)
  return tuple(outputs)


def describe(graph: Graph) -> dict[str, int]:
  """How many ops of each kind: ``{"conv": 52, ...}``."""
  return dict(Counter(op.kind for op in graph.ops))
