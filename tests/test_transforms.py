"""tljax.data.transforms: preprocessing as tf.image.resize and Keras scale it, the evaluation
view, and on-device augmentation (shift, random resized crop, flip)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.data import transforms


def tf_bilinear_resize(x_NHWC, out_h, out_w):
  """NumPy ``tf.image.resize(method="bilinear")``: half-pixel centers, clamped, no antialias."""
  def axis(n_in, n_out):
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    floor = np.floor(centre)
    lower = np.maximum(floor, 0).astype(int)
    upper = np.minimum(np.ceil(centre), n_in - 1).astype(int)
    return lower, upper, centre - floor

  y0, y1, wy = axis(x_NHWC.shape[1], out_h)
  x0, x1, wx = axis(x_NHWC.shape[2], out_w)
  x = x_NHWC.astype(np.float64)
  wx = wx[None, None, :, None]
  top = x[:, y0][:, :, x0] + (x[:, y0][:, :, x1] - x[:, y0][:, :, x0]) * wx
  bottom = x[:, y1][:, :, x0] + (x[:, y1][:, :, x1] - x[:, y1][:, :, x0]) * wx
  return top + (bottom - top) * wy[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# Preprocessing and augmentation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 28, 28, 1), (2, 32, 32, 3)])
def test_preprocess_shapes_and_ranges(shape):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  images[0] = 0
  images[1] = 255
  unit = jax.jit(lambda x: transforms.preprocess(x, size=40, scale="unit"))(images)
  symmetric = transforms.preprocess(images, size=40, scale="symmetric")
  assert unit.shape == symmetric.shape == (2, 40, 40, 3) and unit.dtype == jnp.float32
  np.testing.assert_allclose(unit[0], 0.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(unit[1], 1.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(symmetric[0], -1.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(symmetric[1], 1.0, rtol=0, atol=1e-6)
  assert -1e-6 <= unit.min() and unit.max() <= 1 + 1e-6


def test_preprocess_scales_exactly():
  images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
  unit = np.asarray(transforms.preprocess(images, size=16, scale="unit"))
  symmetric = np.asarray(transforms.preprocess(images, size=16, scale="symmetric"))
  expected = images[..., None].astype(np.float32)
  np.testing.assert_allclose(unit, np.repeat(expected / 255, 3, -1), rtol=0, atol=1e-7)
  np.testing.assert_allclose(symmetric, np.repeat(expected / 127.5 - 1, 3, -1), rtol=0,
                             atol=2e-7)


@pytest.mark.parametrize("size_in, size_out", [(28, 32), (28, 96), (32, 20)])
def test_preprocess_resize_matches_tf_bilinear(size_in, size_out):
  images = np.random.default_rng(size_in + size_out).integers(
      0, 256, (2, size_in, size_in, 3), dtype=np.uint8)
  got = transforms.preprocess(images, size=size_out, scale="unit")
  expected = tf_bilinear_resize(images, size_out, size_out) / 255
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_preprocess_grey_repeats_to_rgb():
  images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
  out = np.asarray(transforms.preprocess(images, size=32, scale="unit"))
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out[..., 0], tf_bilinear_resize(images[..., None], 32, 32)[..., 0]
                             / 255, rtol=0, atol=1e-5)


def test_preprocess_rejects_unknown_scale_and_channels():
  with pytest.raises(ValueError, match=r"Unknown scale 'imagenet'.*\['symmetric', 'unit'\]"):
    transforms.preprocess(np.zeros((1, 4, 4), np.uint8), size=4, scale="imagenet")
  with pytest.raises(ValueError, match="1 or 3 channels"):
    transforms.preprocess(np.zeros((1, 4, 4, 2), np.uint8), size=4, scale="unit")


def test_augment_zero_shift_is_identity():
  images = jnp.ones((2, 8, 8, 3))
  assert transforms.augment(jax.random.PRNGKey(0), images, max_shift=0) is images


def _shift(image, dy, dx):
  """``image`` moved down ``dy`` and right ``dx`` pixels, zero-filled."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def test_augment_translates_each_image_with_zero_fill():
  rng = np.random.default_rng(0)
  images = rng.uniform(1, 2, (16, 8, 8, 3)).astype(np.float32)  # No zeros before shifting.
  key = jax.random.PRNGKey(3)
  augment = jax.jit(lambda k, x: transforms.augment(k, x, max_shift=2))
  out = np.asarray(augment(key, images))
  assert out.shape == images.shape
  np.testing.assert_array_equal(out, augment(key, images))
  shifts = []
  for image, moved in zip(images, out):
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(_shift(image, dy, dx), moved)]
    assert len(matches) == 1
    shifts.append(matches[0])
  assert len(set(shifts)) > 3  # Each image draws its own shift.
  other = augment(jax.random.PRNGKey(4), images)
  assert not np.array_equal(out, other)


# ---------------------------------------------------------------------------------------------
# Photo augmentation and the evaluation view.
# ---------------------------------------------------------------------------------------------


def _photos(n=4, h=8, w=8):
  return (np.random.default_rng(0).integers(0, 256, (n, h, w, 3))).astype(np.uint8)


def test_evaluation_input_without_crop_is_preprocess():
  images = _photos()
  np.testing.assert_array_equal(transforms.evaluation_input(images, size=6, scale="symmetric"),
                                transforms.preprocess(images, size=6, scale="symmetric"))


def test_evaluation_input_takes_the_centre_crop():
  images = _photos(h=10, w=10)
  got = transforms.evaluation_input(images, size=6, scale="unit", crop_fraction=0.6)
  np.testing.assert_array_equal(got, transforms.preprocess(images[:, 2:8, 2:8], size=6,
                                                           scale="unit"))
  with pytest.raises(ValueError, match=r"crop_fraction=0 must be in \(0, 1\]"):
    transforms.evaluation_input(images, size=6, scale="unit", crop_fraction=0)


def test_random_resized_crop_of_the_whole_image_is_a_bilinear_resize():
  images = _photos(h=12, w=12)
  whole = dict(scale_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
  same = transforms.random_resized_crop(jax.random.PRNGKey(0), images, size=12, **whole)
  np.testing.assert_allclose(same, images.astype(np.float32), atol=1e-4)
  smaller = transforms.random_resized_crop(jax.random.PRNGKey(0), images, size=8, **whole)
  np.testing.assert_allclose(smaller, tf_bilinear_resize(images, 8, 8), atol=1e-3)


def test_random_resized_crop_varies_per_image_and_key_within_range():
  images = np.repeat(_photos(n=1, h=16, w=16), 8, axis=0)
  crop = jax.jit(lambda k, x: transforms.random_resized_crop(
      k, x, size=8, scale_range=(0.2, 0.6), ratio_range=(0.75, 1.333)))
  out = np.asarray(crop(jax.random.PRNGKey(1), images))
  assert out.shape == (8, 8, 8, 3) and 0 <= out.min() and out.max() <= 255
  assert len({out[i].tobytes() for i in range(8)}) == 8
  np.testing.assert_array_equal(out, crop(jax.random.PRNGKey(1), images))
  assert not np.array_equal(out, crop(jax.random.PRNGKey(2), images))


def test_random_flip_mirrors_some_images_and_keeps_the_others():
  x = jnp.asarray(_photos(n=16), jnp.float32)
  out = np.asarray(transforms.random_flip(jax.random.PRNGKey(0), x))
  mirrored = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, np.asarray(x))]
  kept = [np.array_equal(o, xi) for o, xi in zip(out, np.asarray(x))]
  assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_training_input_with_only_a_shift_is_the_shift_of_preprocess():
  images, key = _photos(), jax.random.PRNGKey(3)
  got = transforms.training_input(key, images, view=transforms.EvalView(8, "unit"),
                                 augmentation=transforms.Augmentation(shift=2))
  want = transforms.augment(key, transforms.preprocess(images, size=8, scale="unit"), max_shift=2)
  np.testing.assert_array_equal(got, want)


def test_augmentation_from_config():
  from configs import default
  config = default.get_config()
  assert not transforms.Augmentation.from_config(config.data).active
  config.data.random_crop, config.data.flip = True, True
  augmentation = transforms.Augmentation.from_config(config.data)
  assert augmentation.active and augmentation.crop_scale == (0.35, 1.0) and augmentation.flip


def test_eval_view_from_config_is_evaluation_input_and_describes_itself():
  from configs import default
  config = default.get_config()
  config.model.input_size, config.data.scale, config.data.eval_crop = 6, "symmetric", 0.6
  view = transforms.EvalView.from_config(config)
  assert view == transforms.EvalView(size=6, scale="symmetric", crop_fraction=0.6)
  images = _photos(h=10, w=10)
  got = np.asarray(view(images))
  np.testing.assert_array_equal(got, transforms.evaluation_input(
      images, size=6, scale="symmetric", crop_fraction=0.6))
  np.testing.assert_array_equal(got, transforms.preprocess(images[:, 2:8, 2:8], size=6,
                                                           scale="symmetric"))
  assert view.describe() == {"size": 6, "scale": "symmetric", "centre_crop": 0.6}
  whole = transforms.EvalView(6, "unit")
  assert whole.describe() == {"size": 6, "scale": "unit", "centre_crop": 1.0}
  np.testing.assert_array_equal(whole(images), transforms.preprocess(images, size=6, scale="unit"))


def test_model_inputs_are_the_cache_past_a_cut_else_the_view_or_the_augmentation():
  images, key = _photos(), jax.random.PRNGKey(3)
  view, shift = transforms.EvalView(8, "unit"), transforms.Augmentation(shift=2)
  cached = {"block_2_add": jnp.ones((4, 2, 2, 3))}
  past_cut = transforms.model_inputs(cached, key, cut=5, view=view, augmentation=shift)
  assert list(past_cut) == ["block_2_add"] and past_cut["block_2_add"] is cached["block_2_add"]
  np.testing.assert_array_equal(
      transforms.model_inputs({"images": images}, None, cut=0, view=view,
                              augmentation=transforms.Augmentation()), view(images))
  np.testing.assert_array_equal(
      transforms.model_inputs({"images": images}, key, cut=0, view=view, augmentation=shift),
      transforms.training_input(key, images, view=view, augmentation=shift))
