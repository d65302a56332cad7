"""The accuracy gate: each exported file, run in its own runtime on the test split, against
the JAX model.

A float32 file passes when no probability differs from the JAX model's by more than
:data:`FLOAT_TOLERANCE`; an int8 file when its test accuracy is at most ``max_int8_drop``
points below its float32 file's (the JAX model's where that file is missing). A file that
fails is kept under a name that says so (``model.int8.FAILED_GATE.onnx``), not handed over as
if it were fine.
"""

import dataclasses
import pathlib
from typing import Any

import numpy as np

FLOAT_TOLERANCE = 1e-4   # Largest |probability difference| of a float32 file from the JAX model.
MAX_INT8_DROP = 1.0      # Points of test accuracy an int8 file may lose (config export.max_int8_drop).
FAILED = "FAILED_GATE"


@dataclasses.dataclass(frozen=True)
class TestSet:
  """The test split and the JAX model's probabilities for it (the float32 reference)."""
  images: Any            # uint8 [N, ...]: an array or a RowView.
  labels: np.ndarray     # int [N].
  reference: np.ndarray  # float32 [N, classes].

  @property
  def jax_accuracy(self) -> float:
    return float(np.mean(self.reference.argmax(1) == self.labels))


def measure(probabilities: np.ndarray, test: TestSet) -> dict[str, float]:
  """Test accuracy, top-1 agreement with the JAX model, largest |probability difference|."""
  return {"test_accuracy": float(np.mean(probabilities.argmax(1) == test.labels)),
          "top1_agreement": float(np.mean(probabilities.argmax(1) == test.reference.argmax(1))),
          "max_abs_difference": float(np.abs(probabilities - test.reference).max())}


def judge(measured: dict[str, float], precision: str, float_accuracy: float,
          max_int8_drop: float) -> tuple[bool, str]:
  """``(passed, reason)`` of one file's measurements."""
  if precision == "float32":
    difference = measured["max_abs_difference"]
    return (difference <= FLOAT_TOLERANCE,
            f"max |probability difference| from the JAX model {difference:.2e} "
            f"({'within' if difference <= FLOAT_TOLERANCE else 'over'} {FLOAT_TOLERANCE:g})")
  drop = 100 * (float_accuracy - measured["test_accuracy"])
  return (drop <= max_int8_drop,
          f"test accuracy {100 * measured['test_accuracy']:.2f}%, {drop:.2f} points below "
          f"float32's {100 * float_accuracy:.2f}% (at most {max_int8_drop:g} allowed)")


def failed_name(path: pathlib.Path) -> pathlib.Path:
  """``model.int8.onnx`` -> ``model.int8.FAILED_GATE.onnx``."""
  return path.with_name(f"{path.stem}.{FAILED}{path.suffix}")
