"""``model.tflite`` (float32) and ``model.int8.tflite`` (LiteRT), written without TensorFlow.

Every op of an export :class:`~tljax.export.graph.Graph` is a LiteRT builtin operator, so
:func:`to_tflite` writes the flatbuffer directly, with the ``tflite`` package's generated
schema functions on ``flatbuffers``: the view as SLICE, CAST, EXPAND_DIMS, RESIZE_BILINEAR
(``half_pixel_centers``), CONCATENATION, DIV and ADD; each folded convolution as CONV_2D or
DEPTHWISE_CONV_2D with its ReLU6 fused ('SAME' or 'VALID' padding, else a PAD before it);
ADD, MEAN, REDUCE_MAX, FULLY_CONNECTED and SOFTMAX. The batch is dynamic
(``shape_signature`` -1; resize the input before allocating). The model has one signature,
``serving_default``: ``images`` in, ``probabilities`` out.

Int8 (``ranges`` given): the layers run in int8 between a QUANTIZE after the view (or after
the leading layers an int8 export keeps in float32, ``float_layers``) and a DEQUANTIZE before
the classifier (``graph.FLOAT_HEAD``: the dense layer and softmax stay float32): activations
per tensor (scale and zero point from the calibrated min/max, as
onnxruntime computes them), convolution kernels per output channel, symmetric int8, biases
int32 at input scale x kernel scale.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tljax.export import graph as graph_lib

SCHEMA_VERSION = 3
SIGNATURE = "serving_default"
_TYPES = {np.dtype(np.float32): 0, np.dtype(np.int32): 2, np.dtype(np.uint8): 3,
          np.dtype(np.int64): 4, np.dtype(np.int8): 9}
_QUANTIZED = ("conv", "add", "mean", "max", "relu6", "pad")


def quantization(low: float, high: float) -> tuple[float, int]:
  """``(scale, zero_point)`` of int8 for values in [low, high] (the range widened to hold
  0), as onnxruntime's ``compute_scale_zp`` for uint8 with the zero point shifted by -128."""
  low, high = min(float(low), 0.0), max(float(high), 0.0)
  scale = (high - low) / 255.0 or 1.0
  zero_point = int(np.clip(np.round(-low / scale), 0, 255)) - 128
  return scale, zero_point


class _Model:
  """Tensors, buffers, operators; serialized by :meth:`serialize`."""

  def __init__(self):
    self.tensors: list[dict[str, Any]] = []
    self.buffers: list[bytes] = [b""]  # Buffer 0: the empty buffer of every non-constant.
    self.opcodes: dict[int, int] = {}
    self.operators: list[tuple[int, list[int], list[int], str | None, dict]] = []
    self.index: dict[str, int] = {}

  def tensor(self, name: str, shape, dtype, *, batch: bool = False, data=None,
             quant: dict | None = None) -> int:
    """A tensor (its first dimension the dynamic batch if ``batch``); ``data`` makes it a
    constant; ``quant``: ``{"scale", "zero_point", "axis"}``."""
    buffer = 0
    if data is not None:
      self.buffers.append(np.ascontiguousarray(data, dtype).tobytes())
      buffer = len(self.buffers) - 1
    shape = [1, *shape] if batch else list(shape)
    self.tensors.append({"name": name, "shape": shape, "dtype": np.dtype(dtype),
                         "signature": [-1, *shape[1:]] if batch else None,
                         "buffer": buffer, "quant": quant})
    self.index[name] = len(self.tensors) - 1
    return len(self.tensors) - 1

  def constant(self, name: str, value, dtype, quant: dict | None = None) -> int:
    value = np.asarray(value, dtype)
    return self.tensor(name, value.shape, dtype, data=value, quant=quant)

  def op(self, code: int, inputs: list[int], outputs: list[int], options: str | None = None,
         **fields) -> None:
    self.opcodes.setdefault(code, len(self.opcodes))
    self.operators.append((code, inputs, outputs, options, fields))

  # -------------------------------------------------------------------------------------------
  # The flatbuffer.

  def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
    fb = _Flatbuffer()
    buffers = [fb.table("Buffer", Data=fb.data(raw) if raw else None) for raw in self.buffers]
    tensors = [self._tensor_table(fb, t) for t in self.tensors]
    operators = [self._operator_table(fb, *op) for op in self.operators]
    subgraph = fb.table("SubGraph", Tensors=fb.offsets(tensors),
                        Inputs=fb.numbers(inputs, np.int32), Outputs=fb.numbers(outputs, np.int32),
                        Operators=fb.offsets(operators), Name=fb.string("main"))
    codes = [fb.table("OperatorCode", DeprecatedBuiltinCode=min(code, 127), Version=1,
                      BuiltinCode=code)
             for code, _ in sorted(self.opcodes.items(), key=lambda item: item[1])]

    def tensor_maps(indices):
      return fb.offsets([fb.table("TensorMap", Name=fb.string(self.tensors[i]["name"]),
                                  TensorIndex=i) for i in indices])

    signature = fb.table("SignatureDef", Inputs=tensor_maps(inputs),
                         Outputs=tensor_maps(outputs), SignatureKey=fb.string(SIGNATURE),
                         SubgraphIndex=0)
    model = fb.table("Model", Version=SCHEMA_VERSION, OperatorCodes=fb.offsets(codes),
                     Subgraphs=fb.offsets([subgraph]), Description=fb.string(description),
                     Buffers=fb.offsets(buffers), SignatureDefs=fb.offsets([signature]))
    return fb.finish(model)

  @staticmethod
  def _tensor_table(fb: "_Flatbuffer", t: dict[str, Any]) -> int:
    quant = None
    if t["quant"]:
      q = t["quant"]
      quant = fb.table("QuantizationParameters",
                       Scale=fb.numbers(np.atleast_1d(q["scale"]), np.float32),
                       ZeroPoint=fb.numbers(np.atleast_1d(q["zero_point"]), np.int64),
                       QuantizedDimension=q.get("axis", 0))
    return fb.table(
        "Tensor", Shape=fb.numbers(t["shape"], np.int32), Type=_TYPES[t["dtype"]],
        Buffer=t["buffer"], Name=fb.string(t["name"]), Quantization=quant,
        ShapeSignature=fb.numbers(t["signature"], np.int32) if t["signature"] else None)

  def _operator_table(self, fb: "_Flatbuffer", code: int, inputs: list[int],
                      outputs: list[int], options: str | None, fields: dict) -> int:
    options_offset = fb.table(options, **fields) if options else None
    return fb.table(
        "Operator", OpcodeIndex=self.opcodes[code], Inputs=fb.numbers(inputs, np.int32),
        Outputs=fb.numbers(outputs, np.int32),
        BuiltinOptionsType=getattr(fb.schema.BuiltinOptions, options) if options else None,
        BuiltinOptions=options_offset)


class _Flatbuffer:
  """A ``flatbuffers.Builder`` and the ``tflite`` schema's table functions, with the kinds of
  value a LiteRT model is made of."""

  def __init__(self):
    import flatbuffers
    import tflite
    self.builder, self.schema = flatbuffers.Builder(1 << 20), tflite
    self._vectors: dict[tuple[str, bytes], int] = {}

  def table(self, name: str, **fields) -> int:
    getattr(self.schema, f"{name}Start")(self.builder)
    for field, value in fields.items():
      if value is not None:
        getattr(self.schema, f"{name}Add{field}")(self.builder, value)
    return getattr(self.schema, f"{name}End")(self.builder)

  def offsets(self, items: list[int]) -> int:
    self.builder.StartVector(4, len(items), 4)
    for item in reversed(items):
      self.builder.PrependUOffsetTRelative(item)
    return self.builder.EndVector()

  def numbers(self, values, dtype) -> int:
    """A vector of numbers, written once and shared by every table that holds the same ones:
    the int64 zero points of per-channel quantization (all zeros) would otherwise take a
    seventh of an int8 file."""
    array = np.asarray(values, dtype)
    key = (array.dtype.str, array.tobytes())
    if key not in self._vectors:
      self._vectors[key] = self.builder.CreateNumpyVector(array)
    return self._vectors[key]

  def data(self, raw: bytes) -> int:
    """Bytes, 16-byte aligned, as the converter aligns weights."""
    b = self.builder
    b.StartVector(1, len(raw), 16)
    b.head -= len(raw)
    b.Bytes[b.head:b.head + len(raw)] = raw
    return b.EndVector()

  def string(self, text: str) -> int:
    return self.builder.CreateString(text)

  def finish(self, model: int) -> bytes:
    self.builder.Finish(model, file_identifier=b"TFL3")
    return bytes(self.builder.Output())


# ---------------------------------------------------------------------------------------------
# The ops.


def _activation_quant(ranges: Mapping[str, tuple[float, float]] | None, name: str) -> dict | None:
  if ranges is None:
    return None
  if name not in ranges:
    raise graph_lib.ExportError(f"int8 LiteRT: no calibrated range for tensor {name!r}.")
  scale, zero_point = quantization(*ranges[name])
  return {"scale": scale, "zero_point": zero_point}


def _kernel_quant(kernel: np.ndarray, axis: int, bias: np.ndarray,
                  input_scale: float) -> tuple[np.ndarray, dict, np.ndarray, dict]:
  """Symmetric int8 ``kernel`` (a scale per index of ``axis``) and its int32 bias."""
  reduce = tuple(i for i in range(kernel.ndim) if i != axis)
  largest = np.abs(kernel).max(axis=reduce).astype(np.float64)
  # A kernel of zeros (a dead channel) takes the scale that still holds its bias in int32.
  scale = np.maximum(largest / 127.0, np.abs(bias) / (input_scale * 2.0**30) + 1e-12)
  shape = [-1 if i == axis else 1 for i in range(kernel.ndim)]
  q_kernel = np.clip(np.round(kernel / scale.reshape(shape)), -127, 127).astype(np.int8)
  bias_scale = input_scale * scale
  q_bias = np.round(bias / bias_scale).astype(np.int32)
  zero_points = np.zeros(len(scale), np.int64)
  return (q_kernel, {"scale": scale, "zero_point": zero_points, "axis": axis},
          q_bias, {"scale": bias_scale, "zero_point": zero_points, "axis": 0})


def _write_view_op(m: _Model, op: graph_lib.Op, graph: graph_lib.Graph) -> None:
  import tflite
  code, a = tflite.BuiltinOperator, op.attrs
  x = m.index[op.inputs[0]]
  shape = graph.shapes[op.output]
  dtype = np.uint8 if op.kind == "crop" else np.float32
  out = m.tensor(op.output, shape, dtype, batch=True)
  rank = len(shape) + 1
  if op.kind == "crop":
    begin = [0, a["top"], a["left"], 0][:rank]
    size = [-1, a["height"], a["width"], -1][:rank]
    m.op(code.SLICE, [x, m.constant(f"{op.output}/begin", begin, np.int32),
                      m.constant(f"{op.output}/size", size, np.int32)], [out],
         "SliceOptions")
  elif op.kind == "cast":
    m.op(code.CAST, [x], [out], "CastOptions", InDataType=_TYPES[np.dtype(np.uint8)],
         OutDataType=_TYPES[np.dtype(np.float32)])
  elif op.kind == "add_channel":
    m.op(code.EXPAND_DIMS, [x, m.constant(f"{op.output}/axis", [3], np.int32)], [out],
         "ExpandDimsOptions")
  elif op.kind == "resize":
    m.op(code.RESIZE_BILINEAR, [x, m.constant(f"{op.output}/size", a["size"], np.int32)],
         [out], "ResizeBilinearOptions", AlignCorners=False, HalfPixelCenters=True)
  elif op.kind == "grey_to_rgb":
    m.op(code.CONCATENATION, [x, x, x], [out], "ConcatenationOptions", Axis=3)
  elif op.kind == "scale":
    divided = m.tensor(f"{op.output}/divided", shape, np.float32, batch=True)
    m.op(code.DIV, [x, m.constant(f"{op.output}/divisor", [a["divisor"]], np.float32)],
         [divided], "DivOptions")
    m.op(code.ADD, [divided, m.constant(f"{op.output}/offset", [a["offset"]], np.float32)],
         [out], "AddOptions")


def _padding(op: graph_lib.Op, in_shape: tuple[int, ...]) -> str | None:
  """'SAME' or 'VALID' if one of them pads as ``op`` does, else None."""
  pads, k, s = op.attrs["pads"], op.attrs["kernel"].shape[0], op.attrs["stride"]
  if pads == ((0, 0), (0, 0)):
    return "VALID"
  same = (graph_lib.same_pads(in_shape[0], k, s), graph_lib.same_pads(in_shape[1], k, s))
  return "SAME" if tuple(map(tuple, pads)) == same else None


def _write_conv(m: _Model, op: graph_lib.Op, graph: graph_lib.Graph, ranges) -> None:
  import tflite
  a = op.attrs
  x = m.index[op.inputs[0]]
  in_shape = tuple(m.tensors[x]["shape"][1:])
  padding = _padding(op, in_shape)
  if padding is None:  # Pad explicitly, then a 'VALID' convolution.
    padded_shape = (in_shape[0] + sum(a["pads"][0]), in_shape[1] + sum(a["pads"][1]), in_shape[2])
    padded = m.tensor(f"{op.output}/padded", padded_shape, m.tensors[x]["dtype"], batch=True,
                      quant=m.tensors[x]["quant"])
    m.op(tflite.BuiltinOperator.PAD, [x, m.constant(
        f"{op.output}/paddings", [[0, 0], *a["pads"], [0, 0]], np.int32)], [padded],
         "PadOptions")
    x, padding = padded, "VALID"
  depthwise = a["groups"] != 1
  # HWIO -> OHWI (CONV_2D); depthwise [kh, kw, C, 1] -> [1, kh, kw, C].
  kernel = a["kernel"].transpose(3, 0, 1, 2)
  axis = 3 if depthwise else 0
  out_quant = _activation_quant(ranges, op.output)
  if ranges is None:
    kernel_t = m.constant(f"{op.output}/kernel", kernel, np.float32)
    bias_t = m.constant(f"{op.output}/bias", a["bias"], np.float32)
    dtype = np.float32
  else:
    q_kernel, k_quant, q_bias, b_quant = _kernel_quant(kernel, axis, a["bias"],
                                                       m.tensors[x]["quant"]["scale"])
    kernel_t = m.constant(f"{op.output}/kernel", q_kernel, np.int8, k_quant)
    bias_t = m.constant(f"{op.output}/bias", q_bias, np.int32, b_quant)
    dtype = np.int8
  out = m.tensor(op.output, graph.shapes[op.output], dtype, batch=True, quant=out_quant)
  fields = {"Padding": getattr(tflite.Padding, padding), "StrideW": a["stride"],
            "StrideH": a["stride"], "DilationWFactor": 1, "DilationHFactor": 1,
            "FusedActivationFunction": (tflite.ActivationFunctionType.RELU6
                                        if a["activation"] == "relu6" else 0)}
  if depthwise:
    m.op(tflite.BuiltinOperator.DEPTHWISE_CONV_2D, [x, kernel_t, bias_t], [out],
         "DepthwiseConv2DOptions", DepthMultiplier=1, **fields)
  else:
    m.op(tflite.BuiltinOperator.CONV_2D, [x, kernel_t, bias_t], [out], "Conv2DOptions",
         **fields)


def _write_layer_op(m: _Model, op: graph_lib.Op, graph: graph_lib.Graph, ranges) -> None:
  import tflite
  code, a = tflite.BuiltinOperator, op.attrs
  if op.kind == "conv":
    return _write_conv(m, op, graph, ranges)
  if ranges is not None and op.kind not in _QUANTIZED:
    raise graph_lib.ExportError(f"int8 LiteRT: op kind {op.kind!r} ({op.output}) has no "
                                "int8 form here.")
  xs = [m.index[name] for name in op.inputs]
  quantized = ranges is not None
  dtype = np.int8 if quantized else np.float32
  if op.kind in ("pad", "max"):  # Their int8 kernels keep the input's scale and zero point.
    quant = m.tensors[xs[0]]["quant"]
  else:
    quant = _activation_quant(ranges, op.output) if quantized else None
  out = m.tensor(op.output, graph.shapes[op.output], dtype, batch=True, quant=quant)
  if op.kind == "affine":
    scaled = m.tensor(f"{op.output}/scaled", graph.shapes[op.output], dtype, batch=True)
    m.op(code.MUL, [xs[0], m.constant(f"{op.output}/multiplier", a["multiplier"], np.float32)],
         [scaled], "MulOptions")
    m.op(code.ADD, [scaled, m.constant(f"{op.output}/shift", a["shift"], np.float32)], [out],
         "AddOptions")
  elif op.kind == "relu6":
    m.op(code.RELU6, xs, [out])
  elif op.kind == "pad":
    m.op(code.PAD, [xs[0], m.constant(f"{op.output}/paddings", [[0, 0], *a["pads"], [0, 0]],
                                      np.int32)], [out], "PadOptions")
  elif op.kind == "add":
    m.op(code.ADD, xs, [out], "AddOptions")
  elif op.kind in ("mean", "max"):
    m.op(code.MEAN if op.kind == "mean" else code.REDUCE_MAX,
         [xs[0], m.constant(f"{op.output}/axes", [1, 2], np.int32)], [out], "ReducerOptions",
         KeepDims=False)
  elif op.kind == "dense":
    kernel_t = m.constant(f"{op.output}/kernel", a["kernel"].T, np.float32)  # -> [out, in].
    bias_t = m.constant(f"{op.output}/bias", a["bias"], np.float32)
    m.op(code.FULLY_CONNECTED, [xs[0], kernel_t, bias_t], [out], "FullyConnectedOptions",
         KeepNumDims=False)
  elif op.kind == "softmax":
    m.op(code.SOFTMAX, xs, [out], "SoftmaxOptions", Beta=1.0)
  else:
    raise graph_lib.ExportError(f"LiteRT: no operator for op kind {op.kind!r} ({op.output}).")


def _int8(m: _Model, name: str, graph: graph_lib.Graph, ranges) -> str:
  """``name`` if it is int8, else (once) a QUANTIZE of it."""
  if m.tensors[m.index[name]]["dtype"] != np.float32:
    return name
  if f"{name}/int8" not in m.index:
    import tflite
    m.op(tflite.BuiltinOperator.QUANTIZE, [m.index[name]],
         [m.tensor(f"{name}/int8", graph.shapes[name], np.int8, batch=True,
                   quant=_activation_quant(ranges, name))])
  return f"{name}/int8"


def _float32(m: _Model, name: str, graph: graph_lib.Graph, ranges) -> str:
  """``name`` if it is float32, else (once) a DEQUANTIZE of it."""
  del ranges
  if m.tensors[m.index[name]]["dtype"] == np.float32:
    return name
  if f"{name}/float" not in m.index:
    import tflite
    m.op(tflite.BuiltinOperator.DEQUANTIZE, [m.index[name]],
         [m.tensor(f"{name}/float", graph.shapes[name], np.float32, batch=True)])
  return f"{name}/float"


def to_tflite(graph: graph_lib.Graph, ranges: Mapping[str, tuple[float, float]] | None = None,
              description: str = "tljax", float_layers: Sequence[str] = ()) -> bytes:
  """The LiteRT flatbuffer of ``graph``: uint8 ``images [batch, *image_shape]`` in, float32
  ``probabilities [batch, classes]`` out; int8 between the view and the softmax where
  ``ranges`` (calibrated ``{tensor: (min, max)}``) is given, but for the layers that write
  ``float_layers``."""
  m = _Model()
  images = m.tensor(graph_lib.INPUT, graph.image_shape, np.uint8, batch=True)
  for op in graph.ops:
    if op.kind in graph_lib.PREPROCESSING:
      _write_view_op(m, op, graph)
      continue
    quantized = (ranges is not None and op.kind not in graph_lib.FLOAT_HEAD
                 and op.output not in float_layers)
    if ranges is not None:  # A QUANTIZE or DEQUANTIZE where the precision changes.
      convert = _int8 if quantized else _float32
      op = graph_lib.Op(op.kind, tuple(convert(m, name, graph, ranges) for name in op.inputs),
                        op.output, op.attrs)
    _write_layer_op(m, op, graph, ranges if quantized else None)
  return m.serialize([images], [m.index[graph_lib.OUTPUT]], description)


def write(graph: graph_lib.Graph, path: pathlib.Path,
          ranges: Mapping[str, tuple[float, float]] | None = None,
          description: str = "tljax", float_layers: Sequence[str] = ()) -> pathlib.Path:
  """Writes :func:`to_tflite` of ``graph`` (int8 where ``ranges`` is given, but for
  ``float_layers``) to ``path``."""
  path.write_bytes(to_tflite(graph, ranges, description, float_layers))
  return path
