"""One image file to pixels: any format and mode Pillow reads, as 8-bit RGB.

:func:`load_image` gives the full-size pixels (for prediction on a user's file);
:func:`load_stored` gives the square, resized pixels the decoded cache holds. Both apply the
EXIF orientation (phone photos), turn every mode (grey, palette, CMYK, 16-bit, ...) into
8-bit RGB and composite transparency on white, as a product photo on a transparent
background is usually meant to be seen. A file that cannot be read raises :class:`ImageError`
naming the path and the cause.

Large photos decode without Pillow's ``DecompressionBombWarning`` (a 108-megapixel phone photo
is a photo, and the cache decodes JPEGs at a reduced scale); an image over Pillow's hard limit
(twice ``Image.MAX_IMAGE_PIXELS``: 179 megapixels) is an ImageError saying so.

This module imports only NumPy and Pillow, so decode worker processes start fast.
"""

import os
import pathlib
import threading
import time
import warnings

import numpy as np
from PIL import Image, ImageOps

# What a folder dataset reads; other files are ignored (and counted).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WHITE = (255, 255, 255)


class ImageError(ValueError):
  """An image file cannot be read or decoded; the message names the path and the cause."""

  def __init__(self, path: str | os.PathLike, cause: str):
    super().__init__(f"{path}: {cause}; replace or remove it.")
    self.path, self.cause = os.fspath(path), cause


def is_image_name(name: str) -> bool:
  """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _to_rgb(image: Image.Image) -> Image.Image:
  """``image`` in 8-bit RGB: alpha composited on white, 16-bit values scaled to 8 bits."""
  if image.mode in _SIXTEEN_BIT_MODES:
    grey = np.asarray(image).astype(np.float64) / 257.0
    image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
  elif image.mode == "F":
    image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB") if image.mode != "RGB" else image


def _open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
  """Opens, decodes (at a reduced JPEG scale no smaller than ``draft_size`` if given), applies
  the EXIF orientation and converts to RGB; raises ImageError for any failure."""
  path = pathlib.Path(path)
  try:
    if path.stat().st_size == 0:
      raise ImageError(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as image:
        image.seek(0)  # The first frame of an animated GIF or WebP.
        if draft_size and image.format == "JPEG":
          image.draft("RGB", (draft_size, draft_size))
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
  except ImageError:
    raise
  except Image.DecompressionBombError:
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    raise ImageError(path, f"more than {limit:,} pixels, Pillow's limit against decompression "
                     "bombs (if it is a real photo, make it smaller)") from None
  except PermissionError:
    raise ImageError(path, "Permission denied: the file cannot be opened; check its "
                     "permissions") from None
  except Image.UnidentifiedImageError:
    raise ImageError(path, "not an image Pillow can identify (expected JPEG, PNG, BMP, GIF, "
                     "WebP or TIFF)") from None
  except Exception as e:  # noqa: BLE001 - decoders fail on bad data with many exception types.
    raise ImageError(path, f"cannot be read as an image ({type(e).__name__}: {e})") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
  """The pixels of one image file: uint8 [H, W, 3], upright (EXIF orientation applied).

  Reads JPEG, PNG, BMP, GIF (first frame), WebP and TIFF in any mode; transparency is
  composited on white. Raises ImageError naming ``path`` and the cause if it cannot.
  """
  return np.asarray(_open_rgb(path))


def resize_stored(image: Image.Image, size: int) -> np.ndarray:
  """``image`` resized (bilinear, antialiased; aspect ratio not kept, as Keras's
  ``image_dataset_from_directory`` does) to uint8 [size, size, 3]."""
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(image, np.uint8)


def load_stored(path: str | os.PathLike, size: int) -> np.ndarray:
  """The decoded-cache form of one image file: uint8 [size, size, 3].

  JPEGs are decoded at the smallest of libjpeg's 1/1 ... 1/8 scales that stays at least
  ``size`` pixels on each side, which makes decoding several times faster.
  """
  return resize_stored(_open_rgb(path, draft_size=size), size)


def exit_with_parent(parent_pid: int) -> None:
  """Decode-pool worker initializer: the worker exits (within 0.2 s) once process
  ``parent_pid`` is gone, killed before it could stop its pool, instead of waiting forever on
  the pool's pipe."""
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.2)
    os._exit(1)
  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def try_load_stored(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
  """``(load_stored(path, size), None)``, or ``(None, the cause)`` if the file cannot be
  read."""
  try:
    return load_stored(path, size), None
  except ImageError as e:
    return None, e.cause
