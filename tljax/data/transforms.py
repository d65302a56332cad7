"""On-device preprocessing, inside the jitted steps: stored uint8 images -> model input.

:class:`EvalView` is the one deterministic view (size, scale, centre crop) of evaluation,
prediction, prefix caching, export and unaugmented training; it is built once from the
config and handed to each of them. :class:`Augmentation` is what a phase changes at random in
its training images (resized crop, flip, shift).
"""

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

SCALES = {"unit": (255.0, 0.0),        # (divisor, offset): the tutorial's x / 255,
          "symmetric": (127.5, -1.0)}  # MobileNetV2's preprocess_input: x / 127.5 - 1.



def preprocess(images: jax.Array, *, size: int, scale: str) -> jax.Array:
  """uint8 [B,H,W] or [B,H,W,C] (C 1 or 3) -> float32 [B,size,size,3] model input.

  Resizes like ``tf.image.resize(method="bilinear")`` (half-pixel centers, no antialiasing),
  repeats grey to RGB, then scales: ``"unit"`` x/255, ``"symmetric"`` x/127.5 - 1.
  """
  if scale not in SCALES:
    raise ValueError(f"Unknown scale {scale!r}; expected one of {sorted(SCALES)}.")
  x_NHWC = images.astype(jnp.float32)
  if x_NHWC.ndim == 3:
    x_NHWC = x_NHWC[..., None]
  b, h, w, c = x_NHWC.shape
  if c not in (1, 3):
    raise ValueError(f"preprocess expects 1 or 3 channels, got images of shape {images.shape}.")
  if (h, w) != (size, size):
    x_NHWC = jax.image.resize(x_NHWC, (b, size, size, c), method="bilinear", antialias=False)
  if c == 1:
    x_NHWC = jnp.repeat(x_NHWC, 3, axis=-1)
  divisor, offset = SCALES[scale]
  return x_NHWC / divisor + offset


def evaluation_input(images: jax.Array, *, size: int, scale: str,
                     crop_fraction: float = 1.0) -> jax.Array:
  """Stored uint8 images [B,H,W(,C)] -> float32 [B,size,size,3]: the model input of
  evaluation, prediction and unaugmented training.

  Takes the centre crop of ``crop_fraction`` of each side (1.0: the whole image), then
  :func:`preprocess` (bilinear resize, grey to RGB, scaling).
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
  if crop_fraction < 1.0:
    h, w = images.shape[1:3]
    crop_h, crop_w = max(1, round(h * crop_fraction)), max(1, round(w * crop_fraction))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    images = images[:, top:top + crop_h, left:left + crop_w]
  return preprocess(images, size=size, scale=scale)


@dataclasses.dataclass(frozen=True)
class EvalView:
  """How a stored image becomes model input when nothing is random: the centre crop of
  ``crop_fraction`` of each side, a bilinear resize to ``size``, grey to RGB, ``scale``."""
  size: int
  scale: str
  crop_fraction: float = 1.0

  @classmethod
  def from_config(cls, config) -> "EvalView":
    """The view a run's config asks for (``model.input_size``, ``data.scale``,
    ``data.eval_crop``)."""
    return cls(size=config.model.input_size, scale=config.data.scale,
               crop_fraction=config.data.eval_crop)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Stored uint8 images [B,H,W(,C)] -> float32 [B,size,size,3]."""
    return evaluation_input(images, size=self.size, scale=self.scale,
                            crop_fraction=self.crop_fraction)

  def describe(self) -> dict:
    """The view as exported files record it."""
    return {"size": self.size, "scale": self.scale, "centre_crop": self.crop_fraction}


def _bilinear_weights(start: jax.Array, length: jax.Array, n_in: int, n_out: int) -> jax.Array:
  """[n_out, n_in] weights sampling ``[start, start + length)`` of an axis of ``n_in`` pixels
  at ``n_out`` evenly spaced points (half-pixel centres, clamped at the edges)."""
  centres = start + (jnp.arange(n_out) + 0.5) * (length / n_out) - 0.5
  centres = jnp.clip(centres, 0.0, n_in - 1.0)
  lower = jnp.floor(centres)
  frac = (centres - lower)[:, None]
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, n_in - 1)
  return (jax.nn.one_hot(lower, n_in) * (1.0 - frac) + jax.nn.one_hot(upper, n_in) * frac)


def random_resized_crop(rng: jax.Array, images: jax.Array, *, size: int,
                        scale_range: tuple[float, float],
                        ratio_range: tuple[float, float]) -> jax.Array:
  """uint8 [B,H,W(,C)] -> float32 [B,size,size,C] (pixel values, not yet scaled): each image's
  own random crop, resized (bilinear).

  A crop covers an area fraction drawn uniformly from ``scale_range`` with a width / height
  ratio drawn log-uniformly from ``ratio_range`` (each side clipped to the image), at a
  uniformly random position: Inception's and timm's ``RandomResizedCrop``.
  """
  x_NHWC = images.astype(jnp.float32)
  if x_NHWC.ndim == 3:
    x_NHWC = x_NHWC[..., None]
  b, h, w, _ = x_NHWC.shape
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (b,), minval=scale_range[0], maxval=scale_range[1])
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=math.log(ratio_range[0]),
                                     maxval=math.log(ratio_range[1])))
  crop_h = jnp.clip(jnp.sqrt(area / ratio) * h, 1.0, h)
  crop_w = jnp.clip(jnp.sqrt(area * ratio) * w, 1.0, w)
  top = jax.random.uniform(k_top, (b,)) * (h - crop_h)
  left = jax.random.uniform(k_left, (b,)) * (w - crop_w)
  rows = jax.vmap(_bilinear_weights, (0, 0, None, None))(top, crop_h, h, size)
  cols = jax.vmap(_bilinear_weights, (0, 0, None, None))(left, crop_w, w, size)
  return jnp.einsum("boh,bhwc,bpw->bopc", rows, x_NHWC, cols)


def random_flip(rng: jax.Array, x_NHWC: jax.Array) -> jax.Array:
  """Mirrors each image of [B,H,W,C] left-right with probability 1/2."""
  flipped = jax.random.bernoulli(rng, 0.5, (x_NHWC.shape[0], 1, 1, 1))
  return jnp.where(flipped, x_NHWC[:, :, ::-1], x_NHWC)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random changes to training images, made on device (see :func:`training_input`)."""
  shift: int = 0                                   # Translation of up to N pixels.
  crop_scale: tuple[float, float] | None = None    # Random resized crop; None = off.
  crop_ratio: tuple[float, float] = (0.75, 1.333)
  flip: bool = False

  @property
  def active(self) -> bool:
    return bool(self.shift or self.crop_scale or self.flip)

  @classmethod
  def from_config(cls, data_config) -> "Augmentation":
    """The augmentation the ``data`` section of a config asks for."""
    return cls(shift=data_config.augment_shift,
               crop_scale=tuple(data_config.crop_scale) if data_config.random_crop else None,
               crop_ratio=tuple(data_config.crop_ratio), flip=data_config.flip)


def training_input(rng: jax.Array, images: jax.Array, *, view: EvalView,
                   augmentation: Augmentation) -> jax.Array:
  """Stored uint8 images -> augmented float32 [B,size,size,3] model input.

  A random resized crop (else ``view``), then a random flip, then a random shift, each where
  ``augmentation`` asks for it.
  """
  if augmentation.crop_scale:
    x_NHWC = random_resized_crop(jax.random.fold_in(rng, 1), images, size=view.size,
                                 scale_range=augmentation.crop_scale,
                                 ratio_range=augmentation.crop_ratio)
    x_NHWC = preprocess(x_NHWC, size=view.size, scale=view.scale)
  else:
    x_NHWC = view(images)
  if augmentation.flip:
    x_NHWC = random_flip(jax.random.fold_in(rng, 2), x_NHWC)
  return augment(rng, x_NHWC, max_shift=augmentation.shift)


def augment(rng: jax.Array, images: jax.Array, *, max_shift: int) -> jax.Array:
  """Translates each image of [B,H,W,C] by its own random (dy, dx) in [-max_shift, max_shift],
  filling with zeros. ``max_shift=0`` returns ``images`` itself."""
  if max_shift < 0:
    raise ValueError(f"max_shift={max_shift} must be >= 0.")
  if max_shift == 0:
    return images
  b, h, w, c = images.shape
  m = max_shift
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
  corners = jax.random.randint(rng, (b, 2), 0, 2 * m + 1)

  def crop(image_HWC, corner):
    return jax.lax.dynamic_slice(image_HWC, (corner[0], corner[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, corners)


def model_inputs(batch: Mapping[str, jax.Array], rng: jax.Array | None, *, cut: int,
                 view: EvalView, augmentation: Augmentation):
  """What the model reads at layer ``cut`` for one gathered batch: past a cached prefix
  (``cut`` > 0) the cached tensors themselves; else the images, augmented where
  ``augmentation`` is active, else in ``view``."""
  if cut:
    return dict(batch)
  if augmentation.active:
    return training_input(rng, batch["images"], view=view, augmentation=augmentation)
  return view(batch["images"])
