"""The trained model as files that run without tljax: ``<workdir>/export/``.

A run ends by exporting its whole inference function, uint8 images in and class
probabilities out, with the evaluation preprocessing (``EvalView``: centre crop, bilinear
resize, scale) and the trained weights inside, for any batch size, in each format:

* ``model.jax_exported``: ``jax.export`` (StableHLO and weights; needs jax), ``jax_format.py``;
* ``model.onnx`` and ``model.int8.onnx`` (onnxruntime; int8: static, per-channel weights),
  ``onnx_format.py``;
* ``model.tflite`` and ``model.int8.tflite`` (LiteRT, for Android and iOS),
  ``tflite_format.py``;
* ``predict.py``: a standalone predictor (NumPy, Pillow and the file's runtime),
  ``predictor.py``;
* ``model.json``: the class names, the whole input contract (``contract.py``), and each
  file's size and accuracy-gate results (``gate.py``).

The ONNX and LiteRT writers translate a graph built from the model contract (``graph.py``:
the layer kinds, BatchNorm folded into the convolutions), not a particular backbone.
:func:`write` makes all of them and checks each in its runtime (``deploy.py``);
``python -m tljax.export --workdir W`` (re)exports a finished run.
"""

from tljax.export.deploy import CALIBRATION_IMAGES, FILES, FORMATS, PREDICTOR, write
from tljax.export.gate import FLOAT_TOLERANCE, MAX_INT8_DROP
from tljax.export.graph import ExportError
from tljax.export.jax_format import (ARTIFACT, METADATA, export_model, inference_function, load,
                                     platforms, predict, save)

__all__ = ["ARTIFACT", "CALIBRATION_IMAGES", "ExportError", "FILES", "FLOAT_TOLERANCE",
           "FORMATS", "MAX_INT8_DROP", "METADATA", "PREDICTOR", "export_model",
           "inference_function", "load", "platforms", "predict", "save", "write"]
