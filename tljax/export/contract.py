"""What ``model.json`` says about every exported file: the classes and the input contract.

Every file in ``export/`` takes the same input: a batch of uint8 images in the form the run
stored them (``input.shape``), and does the same inside (``preprocessing``). What happens to
a photo before it goes in is ``input_contract.before_the_model``: tljax's decoding and resize
to the stored size (``tljax.data.images`` for a folder run, ``tljax.predict.stored_form`` for
an IDX run), which ``export/predict.py`` repeats.
"""

from collections.abc import Sequence
from typing import Any

from tljax.data import transforms

OUTPUT_MEANING = "class probabilities (softmax), in class_names order"


def before_the_model(image_shape: Sequence[int]) -> dict[str, Any]:
  """How an image file becomes one uint8 input image of ``image_shape``."""
  height, width = image_shape[:2]
  decode = ("Pillow: the first frame; EXIF orientation applied; any mode to 8-bit RGB "
            "(transparency composited on white, 16-bit values / 257)")
  if len(image_shape) == 3:
    return {"form": "rgb", "size": [height, width], "decode": decode,
            "jpeg_draft": "JPEGs decoded at the smallest libjpeg scale (1/1 .. 1/8) that "
                          "keeps both sides at least the stored size",
            "resize": "Pillow Image.resize(BILINEAR) (antialiased), to the stored size; the "
                      "aspect ratio is not kept",
            "reference": "tljax.data.images.load_stored"}
  return {"form": "grey", "size": [height, width], "decode": decode,
          "grey": "Pillow convert('L') of the RGB image",
          "resize": "Pillow Image.resize(BILINEAR) (antialiased), to the stored size; the "
                    "aspect ratio is not kept",
          "reference": "tljax.predict.stored_form"}


def inside_the_model(view: transforms.EvalView, image_shape: Sequence[int]) -> list[str]:
  """The evaluation view as steps, in order."""
  steps = []
  if view.crop_fraction < 1.0:
    steps.append(f"centre crop of {view.crop_fraction} of each side")
  steps.append(f"bilinear resize to {view.size}x{view.size} (half-pixel centres, no "
               "antialiasing: jax.image.resize(antialias=False))")
  if len(image_shape) == 2 or image_shape[-1] == 1:
    steps.append("grey repeated to 3 channels")
  divisor, offset = transforms.SCALES[view.scale]
  steps.append(f"x / {divisor} {'+' if offset >= 0 else '-'} {abs(offset)}")
  return steps


def metadata(class_names: Sequence[str], image_shape: Sequence[int],
             view: transforms.EvalView) -> dict[str, Any]:
  """``model.json`` less what the files' writers and checks add."""
  grey = len(image_shape) == 2 or image_shape[-1] == 1
  return {
      "class_names": list(class_names),
      "input": {"shape": [None, *map(int, image_shape)], "dtype": "uint8"},
      "output": {"shape": [None, len(class_names)], "dtype": "float32",
                 "meaning": OUTPUT_MEANING},
      "preprocessing": view.describe(),
      "input_contract": {
          "name": "images", "dtype": "uint8", "value_range": [0, 255],
          "layout": "NHW" if len(image_shape) == 2 else "NHWC",
          "channel_order": "grey" if grey else "RGB", "batch": "any size",
          "before_the_model": before_the_model(image_shape),
          "inside_the_model": inside_the_model(view, image_shape),
      },
  }


def calibration(temperature: float | None) -> dict[str, Any]:
  """How the output probabilities were calibrated: the temperature fitted on the validation
  split, already inside every file (the head's kernel and bias divided by it)."""
  if temperature is None:
    return {"temperature": None, "how": "not calibrated (temperature 1)"}
  return {"temperature": temperature,
          "how": "temperature scaling fitted on the validation split; folded into the head "
                 "(its kernel and bias divided by the temperature), so the outputs are the "
                 "calibrated probabilities with nothing to apply"}
