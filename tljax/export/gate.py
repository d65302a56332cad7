"""The accuracy gate: each exported file, run in its own runtime on the test split, against
the JAX model.

A float32 file passes when no probability differs from the JAX model's by more than
:data:`FLOAT_TOLERANCE` and its top-1 answers agree on at least :data:`FLOAT_AGREEMENT` of the
test images. Summing in another order moves a fine-tuned model's probabilities by up to about
1e-3 (JAX's own float32 result is as far from a float64 evaluation as the files are; see
docs/deploying.md); a wrong operator moves them by far more and changes answers. An int8
file passes when its test accuracy is at most ``max_int8_drop`` points below its float32
file's (the JAX model's where that file is missing). A file that fails is kept under a name that says so (``model.int8.FAILED_GATE.onnx``), not handed over as
if it were fine.
"""

import dataclasses
import pathlib
from typing import Any

import numpy as np

FLOAT_TOLERANCE = 1e-2   # Largest |probability difference| of a float32 file from the JAX model.
FLOAT_AGREEMENT = 0.999  # Smallest top-1 agreement of a float32 file with the JAX model.
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
          max_int8_drop: float, split: str = "test") -> tuple[bool, str]:
  """``(passed, reason)`` of one file's measurements (on the ``split`` split)."""
  if precision == "float32":
    difference, agreement = measured["max_abs_difference"], measured["top1_agreement"]
    passed = difference <= FLOAT_TOLERANCE and agreement >= FLOAT_AGREEMENT
    return (passed, f"max |probability difference| from the JAX model {difference:.2e} "
                    f"(at most {FLOAT_TOLERANCE:g}), top-1 agreement {100 * agreement:.2f}% "
                    f"(at least {100 * FLOAT_AGREEMENT:g}%)")
  drop = 100 * (float_accuracy - measured["test_accuracy"])
  return (drop <= max_int8_drop,
          f"{split} accuracy {100 * measured['test_accuracy']:.2f}%, {drop:.2f} points below "
          f"float32's {100 * float_accuracy:.2f}% (at most {max_int8_drop:g} allowed)")


def failed_name(path: pathlib.Path) -> pathlib.Path:
  """``model.int8.onnx`` -> ``model.int8.FAILED_GATE.onnx``."""
  return path.with_name(f"{path.stem}.{FAILED}{path.suffix}")
