"""3x3 depthwise convolution, two ways: XLA's grouped convolution and nine shifted multiply-adds.

Both compute the same function (NHWC input, a Keras-layout ``[kh, kw, C, 1]`` kernel). XLA:CPU
runs grouped convolutions (``feature_group_count=C``) very slowly; a sum of ``kh * kw`` strided
slices, each scaled per channel, is 20-50x faster there, and its gradient is a sum of pads.
On GPU and TPU XLA's own convolution is the better choice.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "shifted", "xla"]
IMPLS = ("auto", "shifted", "xla")


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """Returns the concrete implementation for ``impl``: "auto" means "shifted" on CPU, else "xla"."""
  if impl not in IMPLS:
    raise ValueError(f"depthwise implementation {impl!r} is not one of {IMPLS}; "
                     "use 'auto' to choose by backend.")
  if impl != "auto":
    return impl
  return "shifted" if (backend or jax.default_backend()) == "cpu" else "xla"


def depthwise_conv_xla(x_NHWC: jax.Array, kernel_HWC1: jax.Array, stride: int,
                       padding: str) -> jax.Array:
  """Depthwise convolution as XLA's grouped convolution."""
  kh, kw, channels, _ = kernel_HWC1.shape
  return lax.conv_general_dilated(
      x_NHWC, kernel_HWC1.reshape(kh, kw, 1, channels), window_strides=(stride, stride),
      padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def depthwise_conv_shifted(x_NHWC: jax.Array, kernel_HWC1: jax.Array, stride: int,
                           padding: str) -> jax.Array:
  """Depthwise convolution as a sum of ``kh * kw`` strided slices scaled per channel.

  Taps that read only padding are left out: on a 1x1 map a 'SAME' 3x3 depthwise convolution
  is one per-channel scale.
  """
  kh, kw = kernel_HWC1.shape[:2]
  n, h, w, c = x_NHWC.shape
  (pt, pb), (pl, pr) = lax.padtype_to_pads((h, w), (kh, kw), (stride, stride), padding)
  x = jnp.pad(x_NHWC, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out_h = (h + pt + pb - kh) // stride + 1
  out_w = (w + pl + pr - kw) // stride + 1
  rows = [i for i in range(kh) if _reads_input(i, stride, out_h, pt, h)]
  cols = [j for j in range(kw) if _reads_input(j, stride, out_w, pl, w)]
  out = None
  for i in rows:
    for j in cols:
      window = lax.slice(x, (0, i, j, 0),
                         (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                         (1, stride, stride, 1))
      term = window * kernel_HWC1[i, j, :, 0]
      out = term if out is None else out + term
  return out


def _reads_input(tap: int, stride: int, out_size: int, pad_before: int, size: int) -> bool:
  """Whether kernel offset ``tap`` reads any of the ``size`` input rows (or columns) that
  follow ``pad_before`` rows of padding, over ``out_size`` strided outputs."""
  return any(pad_before <= tap + o * stride < pad_before + size for o in range(out_size))


def depthwise_conv(x_NHWC: jax.Array, kernel_HWC1: jax.Array, *, stride: int, padding: str,
                   impl: str = "auto") -> jax.Array:
  """Depthwise convolution (depth multiplier 1) with the implementation ``impl``."""
  if resolve_impl(impl) == "shifted":
    return depthwise_conv_shifted(x_NHWC, kernel_HWC1, stride, padding)
  return depthwise_conv_xla(x_NHWC, kernel_HWC1, stride, padding)
