"""``model.onnx`` (float32) and ``model.int8.onnx`` (static int8, QDQ, per-channel weights).

:func:`to_onnx` writes each op of an export :class:`~tljax.export.graph.Graph` as the ONNX
operators of the same meaning, with the ``onnx`` package's helpers: the view as Slice, Cast,
Transpose (to NCHW, ONNX's convolution layout), Unsqueeze, Resize (linear, ``half_pixel``,
no antialiasing: ``jax.image.resize(antialias=False)``), Concat and Div/Add; each folded
convolution as Conv (``group`` = channels for depthwise) and Clip(0, 6); Pad, Add,
GlobalAveragePool/GlobalMaxPool with Flatten, Gemm and Softmax. The batch is symbolic.

:func:`quantize` makes the int8 file with onnxruntime's static quantization: the float
model's activation ranges measured (min/max) on calibration images, weights per output
channel (uint8: see :func:`quantize`), QuantizeLinear/DequantizeLinear pairs around the
layers, the view and the classifier (Gemm, Softmax) left in float32.
"""

import contextlib
import inspect
import logging
import pathlib
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from tljax.export import graph as graph_lib

OPSET = 19       # Resize's antialias attribute needs 18.
IR_VERSION = 9   # What onnxruntime 1.15+ (and onnxruntime-web, mobile) read.
BATCH = "batch"


def _nchw(shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape


class _Writer:
  """Collects nodes and initializers; a tensor keeps its graph name."""

  def __init__(self):
    import onnx
    self.onnx, self.nodes, self.initializers = onnx, [], []

  def constant(self, name: str, value: np.ndarray) -> str:
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op_type: str, inputs: list[str], output: str, name: str, **attrs) -> str:
    self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], name=name, **attrs))
    return output


def _write_view_op(w: _Writer, op: graph_lib.Op, x: str, rank: int) -> None:
  a, name, out = op.attrs, op.output, op.output
  if op.kind == "crop":  # On the uint8 NHWC (or NHW) input.
    w.node("Slice", [x, w.constant(f"{name}_starts", np.array([a["top"], a["left"]])),
                     w.constant(f"{name}_ends", np.array([a["top"] + a["height"],
                                                          a["left"] + a["width"]])),
                     w.constant(f"{name}_axes", np.array([1, 2]))], out, name)
  elif op.kind == "cast":  # Then to NCHW, the layout of ONNX's convolutions.
    if rank == 4:
      w.node("Cast", [x], f"{out}_nhwc", name, to=w.onnx.TensorProto.FLOAT)
      w.node("Transpose", [f"{out}_nhwc"], out, f"{name}_to_nchw", perm=[0, 3, 1, 2])
    else:
      w.node("Cast", [x], out, name, to=w.onnx.TensorProto.FLOAT)
  elif op.kind == "add_channel":
    w.node("Unsqueeze", [x, w.constant(f"{name}_axes", np.array([1]))], out, name)
  elif op.kind == "resize":
    # sizes = [batch, channels, *size]: with ``axes`` instead, onnxruntime's NHWC layout pass
    # for quantized models breaks the node (1.32).
    leading = w.node("Shape", [x], f"{out}_leading", f"{name}_shape", start=0, end=2)
    sizes = w.node("Concat", [leading, w.constant(f"{name}_size", np.array(a["size"]))],
                   f"{out}_sizes", f"{name}_sizes", axis=0)
    w.node("Resize", [x, "", "", sizes], out, name, mode="linear",
           coordinate_transformation_mode="half_pixel", antialias=0)
  elif op.kind == "grey_to_rgb":
    w.node("Concat", [x, x, x], out, name, axis=1)
  elif op.kind == "scale":
    divided = w.node("Div", [x, w.constant(f"{name}_divisor", np.float32(a["divisor"]))],
                     f"{out}_divided", f"{name}_divide")
    w.node("Add", [divided, w.constant(f"{name}_offset", np.float32(a["offset"]))], out, name)


# The names of the nodes a layer op writes: its output's name and these suffixes of it.
_LAYER_NODE_SUFFIXES = ("", "_conv", "_relu6", "_multiply", "_pool")


def _write_layer_op(w: _Writer, op: graph_lib.Op, xs: list[str]) -> None:
  a, name, out = op.attrs, op.output, op.output
  if op.kind == "conv":
    # HWIO -> OIHW; depthwise [kh, kw, C, 1] -> [C, 1, kh, kw].
    kernel = a["kernel"].transpose(3, 2, 0, 1) if a["groups"] == 1 else a["kernel"].transpose(2, 3, 0, 1)
    (top, bottom), (left, right) = a["pads"]
    conv_out = f"{out}_conv" if a["activation"] else out
    w.node("Conv", [xs[0], w.constant(f"{name}_kernel", kernel), w.constant(f"{name}_bias", a["bias"])],
           conv_out, f"{name}_conv", kernel_shape=list(kernel.shape[2:]),
           strides=[a["stride"]] * 2, pads=[top, left, bottom, right], group=a["groups"])
    if a["activation"] == "relu6":
      _relu6(w, conv_out, out, name)
  elif op.kind == "affine":
    scaled = w.node("Mul", [xs[0], w.constant(f"{name}_multiplier", a["multiplier"][:, None, None])],
                    f"{out}_scaled", f"{name}_multiply")
    w.node("Add", [scaled, w.constant(f"{name}_shift", a["shift"][:, None, None])], out, name)
  elif op.kind == "relu6":
    _relu6(w, xs[0], out, name)
  elif op.kind == "pad":
    (top, bottom), (left, right) = a["pads"]
    w.node("Pad", [xs[0], w.constant(f"{name}_pads",
                                     np.array([0, 0, top, left, 0, 0, bottom, right]))],
           out, name, mode="constant")
  elif op.kind == "add":
    w.node("Add", xs, out, name)
  elif op.kind in ("mean", "max"):
    pooled = w.node("GlobalAveragePool" if op.kind == "mean" else "GlobalMaxPool", xs,
                    f"{out}_pooled", f"{name}_pool")
    w.node("Flatten", [pooled], out, name, axis=1)
  elif op.kind == "dense":
    w.node("Gemm", [xs[0], w.constant(f"{name}_kernel", a["kernel"]),
                    w.constant(f"{name}_bias", a["bias"])], out, name)
  elif op.kind == "softmax":
    w.node("Softmax", xs, out, name, axis=-1)
  else:
    raise graph_lib.ExportError(f"ONNX: no operator for op kind {op.kind!r} ({name}).")


def _relu6(w: _Writer, x: str, out: str, name: str) -> None:
  w.node("Clip", [x, w.constant(f"{name}_min", np.float32(0.0)),
                  w.constant(f"{name}_max", np.float32(6.0))], out, f"{name}_relu6")


def to_onnx(graph: graph_lib.Graph, doc: str = ""):
  """The ``onnx.ModelProto`` of ``graph``: uint8 ``images [batch, *image_shape]`` (NHWC, as
  stored) in, float32 ``probabilities [batch, classes]`` out."""
  import onnx
  w = _Writer()
  rank = len(graph.image_shape) + 1
  for op in graph.ops:
    if op.kind in graph_lib.PREPROCESSING:
      _write_view_op(w, op, op.inputs[0], rank)
    else:
      _write_layer_op(w, op, list(op.inputs))
  images = onnx.helper.make_tensor_value_info(graph_lib.INPUT, onnx.TensorProto.UINT8,
                                              [BATCH, *graph.image_shape])
  probabilities = onnx.helper.make_tensor_value_info(graph_lib.OUTPUT, onnx.TensorProto.FLOAT,
                                                     [BATCH, graph.num_classes])
  body = onnx.helper.make_graph(w.nodes, "tljax", [images], [probabilities], w.initializers)
  model = onnx.helper.make_model(body, producer_name="tljax", doc_string=doc,
                                 opset_imports=[onnx.helper.make_opsetid("", OPSET)])
  model.ir_version = IR_VERSION
  onnx.checker.check_model(model, full_check=True)
  return model


def write(graph: graph_lib.Graph, path: pathlib.Path, doc: str = "") -> pathlib.Path:
  """Writes :func:`to_onnx` of ``graph`` to ``path``."""
  path.write_bytes(to_onnx(graph, doc).SerializeToString())
  return path


def float_node_names(model, float_layers: Sequence[str] = ()) -> list[str]:
  """The nodes left in float32 when quantizing: the evaluation view, before the first layer,
  the nodes of the graph ops that write ``float_layers`` (named after them), and the
  classifier (``graph.FLOAT_HEAD``: Gemm and Softmax)."""
  nodes = list(model.graph.node)
  first_layer = next(i for i, n in enumerate(nodes) if n.op_type in ("Conv", "Gemm"))
  kept = {f"{layer}{suffix}" for layer in float_layers for suffix in _LAYER_NODE_SUFFIXES}
  return ([n.name for n in nodes[:first_layer]]
          + [n.name for n in nodes[first_layer:] if n.name in kept]
          + [n.name for n in nodes if n.op_type in ("Gemm", "Softmax")])


@contextlib.contextmanager
def _quiet():
  """onnxruntime's quantizer logs tens of lines through the root logger (a scale raised for a
  channel of zeros, advice); the export logs its own one line per file instead."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    root.setLevel(level)


def quantize(float_path: pathlib.Path, int8_path: pathlib.Path,
             calibration: Iterable[np.ndarray], float_layers: Sequence[str] = (),
             ranges_cache: pathlib.Path | None = None) -> dict[str, tuple[float, float]]:
  """Writes ``int8_path``: ``float_path`` statically quantized (QDQ, uint8 activations and
  per-channel uint8 weights) but for the layers that write ``float_layers``, its activation
  ranges the min/max over the uint8 image batches of ``calibration``. Returns those ranges,
  ``{tensor: (min, max)}``, for other formats to use. ``ranges_cache``: a file that keeps
  them, so that quantizing the same model again (other ``float_layers``) does not calibrate
  again.

  uint8 weights, not int8: on x86 CPUs without VNNI (AVX2 only) onnxruntime multiplies uint8
  activations by int8 weights with an instruction whose 16-bit sums saturate, which cost a
  fine-tuned MobileNetV2 from 2 to 38 points of accuracy there (with 7-bit weights as well);
  uint8 by uint8 does not saturate on any CPU."""
  import onnx
  from onnxruntime import quantization

  class Reader(quantization.CalibrationDataReader):
    def __init__(self):
      self.batches = iter(calibration)

    def get_next(self):
      batch = next(self.batches, None)
      return None if batch is None else {graph_lib.INPUT: np.asarray(batch, np.uint8)}

  options = dict(
      quant_format=quantization.QuantFormat.QDQ, per_channel=True,
      activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QUInt8,
      calibrate_method=quantization.CalibrationMethod.MinMax,
      nodes_to_exclude=float_node_names(onnx.load(float_path), float_layers),
      # DedicatedQDQPair: a tensor read by two layers (a residual) gets a pair for each, or
      # onnxruntime leaves those layers in float32.
      extra_options={"DedicatedQDQPair": True})
  with tempfile.TemporaryDirectory(prefix="tljax_calibration") as scratch, _quiet():
    if "calibration_cache_path" not in inspect.signature(quantization.quantize_static).parameters:
      quantization.quantize_static(str(float_path), str(int8_path), Reader(), **options)
      return ranges_of_quantized(onnx.load(int8_path))  # onnxruntime before the cache.
    cache = ranges_cache or pathlib.Path(scratch) / "ranges.json"
    quantization.quantize_static(str(float_path), str(int8_path), Reader(),
                                 calibration_cache_path=str(cache), **options)
    ranges = quantization.calibrate.load_tensors_data(cache)
  return {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
          for name, data in ranges.items()}


def ranges_of_quantized(model) -> dict[str, tuple[float, float]]:
  """``{tensor: (min, max)}`` that give each activation's uint8 scale and zero point in a QDQ
  model: ``((0 - zero_point) * scale, (255 - zero_point) * scale)``."""
  from onnx import numpy_helper
  constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
  ranges = {}
  for node in model.graph.node:
    if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
      scale, zero_point = float(constants[node.input[1]]), float(constants[node.input[2]])
      ranges[node.input[0]] = (-zero_point * scale, (255.0 - zero_point) * scale)
  return ranges
