"""Images: every format and mode to 8-bit RGB, EXIF orientation, clear errors."""

import numpy as np
import pytest
from PIL import Image

from tljax.data import images

RGB = (np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(12, 10, 3)


@pytest.mark.parametrize("ext,mode", [
    ("jpg", "RGB"), ("jpg", "L"), ("jpg", "CMYK"), ("png", "RGB"), ("png", "L"),
    ("png", "LA"), ("png", "P"), ("png", "RGBA"), ("png", "1"), ("bmp", "RGB"),
    ("gif", "P"), ("webp", "RGB"), ("webp", "RGBA"), ("tiff", "RGB"), ("tiff", "CMYK"),
    ("tiff", "F")])
def test_every_format_and_mode_becomes_uint8_rgb(tmp_path, ext, mode):
  path = tmp_path / f"x.{ext}"
  Image.fromarray(RGB).convert(mode).save(path)
  pixels = images.load_image(path)
  assert pixels.shape == (12, 10, 3) and pixels.dtype == np.uint8
  if (ext, mode) in (("png", "RGB"), ("bmp", "RGB"), ("tiff", "RGB")):  # Lossless.
    np.testing.assert_array_equal(pixels, RGB)


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
  path = tmp_path / "deep.png"
  Image.fromarray(np.array([[0, 257, 65535]], np.uint16)).save(path)
  assert Image.open(path).mode.startswith("I")
  np.testing.assert_array_equal(images.load_image(path)[0, :, 0], [0, 1, 255])


def test_alpha_is_composited_on_white(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[0, 0, 3] = 255  # One opaque red-ish pixel, three transparent ones.
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  pixels = images.load_image(tmp_path / "a.png")
  assert pixels[0, 0].tolist() == [200, 0, 0]
  assert pixels[1, 1].tolist() == [255, 255, 255]


def test_gif_gives_its_first_frame(tmp_path):
  frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
  frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
  assert images.load_image(tmp_path / "a.gif")[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  stored = np.zeros((24, 16, 3), np.uint8)
  stored[:8, :8] = 255  # A white block at the stored top left.
  Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
  pixels = images.load_image(tmp_path / "phone.jpg")
  assert pixels.shape == (16, 24, 3)  # Shown rotated: the block is now at the top right.
  np.testing.assert_allclose(pixels.astype(int), np.rot90(stored, k=-1).astype(int), atol=8)


def test_load_stored_resizes_to_a_square(tmp_path):
  Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(tmp_path / "a.jpg")
  stored = images.load_stored(tmp_path / "a.jpg", 16)
  assert stored.shape == (16, 16, 3) and stored.dtype == np.uint8
  assert abs(int(stored.mean()) - 90) <= 2


@pytest.mark.parametrize("content,cause", [
    (b"", "empty file"), (b"hello, not a picture", "not an image Pillow can identify")])
def test_unreadable_files_name_the_path_and_cause(tmp_path, content, cause):
  path = tmp_path / "bad.jpg"
  path.write_bytes(content)
  with pytest.raises(images.ImageError, match=cause) as e:
    images.load_image(path)
  assert str(path) in str(e.value) and "replace or remove it" in str(e.value)


def test_truncated_jpeg_is_an_image_error(tmp_path):
  path = tmp_path / "cut.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(path)
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(images.ImageError, match="cannot be read as an image") as e:
    images.load_image(path)
  assert str(path) in str(e.value)


def test_missing_file_is_an_image_error(tmp_path):
  with pytest.raises(images.ImageError, match="FileNotFoundError|No such file"):
    images.load_image(tmp_path / "gone.png")


def test_is_image_name():
  assert images.is_image_name("a.JPG") and images.is_image_name("b.tiff")
  assert not images.is_image_name("notes.txt") and not images.is_image_name("jpg")
