"""3x3 depthwise convolution, two ways: XLA's grouped convolution and nine shifted multiply-adds.

Both compute the same function (NHWC input, a Keras-layout ``[kh, kw, C, 1]`` kernel). XLA:CPU
runs grouped convolutions (``feature_group_count=C``) very slowly; a sum of ``kh * kw`` strided
slices, each scaled per channel, is much faster there (measured in benchmarks/README.md), and
so is its gradient, written the same way. On GPU and TPU XLA's own convolution is the better
choice.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x_NHWC: jax.Array, kernel_HWC1: jax.Array, stride: int,
                           padding: str) -> jax.Array:
  """Depthwise convolution as a sum of ``kh * kw`` strided slices scaled per channel.

  Taps that read only padding are left out: on a 1x1 map a 'SAME' 3x3 depthwise convolution
  is one per-channel scale. The input's gradient is computed the same way, as a sum of slices
  of the (dilated, padded) output gradient scaled by the flipped kernel, instead of the
  automatic derivative's sum of one padded copy of the output gradient per tap.
  """
  return _shifted_forward(x_NHWC, kernel_HWC1, stride, padding)[0]


def _geometry(x_shape, kernel_shape, stride, padding):
  """Pads, output size and the taps that read the input, per spatial axis."""
  kh, kw = kernel_shape[:2]
  _, h, w, _ = x_shape
  (pt, pb), (pl, pr) = lax.padtype_to_pads((h, w), (kh, kw), (stride, stride), padding)
  out_h = (h + pt + pb - kh) // stride + 1
  out_w = (w + pl + pr - kw) // stride + 1
  rows = [i for i in range(kh) if _reads_input(i, stride, out_h, pt, h)]
  cols = [j for j in range(kw) if _reads_input(j, stride, out_w, pl, w)]
  return (pt, pb, pl, pr), (out_h, out_w), rows, cols


def windows(x_NHWC, kernel_shape, stride, padding, every_tap=False):
  """Yields ``((i, j), window)``, taps in row-major order: the padded input's strided slice
  that tap (i, j) of a ``kernel_shape[:2]`` kernel reads. Taps that read only padding are
  left out unless ``every_tap``."""
  (pt, pb, pl, pr), (out_h, out_w), rows, cols = _geometry(x_NHWC.shape, kernel_shape, stride,
                                                           padding)
  if every_tap:
    rows, cols = range(kernel_shape[0]), range(kernel_shape[1])
  n, _, _, c = x_NHWC.shape
  x = jnp.pad(x_NHWC, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  for i in rows:
    for j in cols:
      yield (i, j), lax.slice(x, (0, i, j, 0),
                              (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                              (1, stride, stride, 1))


def _shifted_forward(x_NHWC, kernel_HWC1, stride, padding):
  out = None
  for (i, j), window in windows(x_NHWC, kernel_HWC1.shape, stride, padding):
    term = window * kernel_HWC1[i, j, :, 0]
    out = term if out is None else out + term
  return out, (x_NHWC, kernel_HWC1)


def _shifted_backward(stride, padding, residuals, dy):
  x_NHWC, kernel_HWC1 = residuals
  kh, kw = kernel_HWC1.shape[:2]
  _, h, w, _ = x_NHWC.shape
  (pt, _, pl, _), (out_h, out_w), _, _ = _geometry(x_NHWC.shape, kernel_HWC1.shape, stride,
                                                   padding)
  # dy[o] lands at kh - 1 + o * stride; input row a' then reads it through tap i at
  # a' + pt + kh - 1 - i. Negative high padding drops outputs that read only padding.
  dy_padded = lax.pad(dy, jnp.zeros((), dy.dtype), (
      (0, 0, 0), (kh - 1, pt + h - 1 - (out_h - 1) * stride, stride - 1),
      (kw - 1, pl + w - 1 - (out_w - 1) * stride, stride - 1), (0, 0, 0)))
  dx, group_sums = None, {}
  for (i, j), window in windows(x_NHWC, kernel_HWC1.shape, stride, padding):
    group_sums[i, j] = _sum_over_batch_groups(window * dy)
    start = (0, pt + kh - 1 - i, pl + kw - 1 - j, 0)
    shifted = lax.slice(dy_padded, start, (dy.shape[0], start[1] + h, start[2] + w, dy.shape[3]))
    term = shifted * kernel_HWC1[i, j, :, 0]
    dx = term if dx is None else dx + term
  # The barrier keeps XLA from folding the two sums back into one reduction of the products.
  tap_sums = jnp.sum(lax.optimization_barrier(jnp.stack(list(group_sums.values()))),
                     axis=(1, 2, 3))
  rows, cols = zip(*group_sums)
  return dx, jnp.zeros_like(kernel_HWC1).at[rows, cols, :, 0].set(tap_sums)


def _sum_over_batch_groups(products_NHWC: jax.Array, group: int = 8) -> jax.Array:
  """``[N / g, H, W, C]``: sums of each ``g`` consecutive examples (``g`` the largest divisor of
  N up to ``group``), an elementwise sum of slices.

  The kernel's gradient sums ``window * dy`` over batch and space for each channel; as one
  reduction to ``[C]`` XLA:CPU reads each tap's window through a copy and reduces it several
  times slower than this two-step form (measured in benchmarks/README.md).
  """
  n = products_NHWC.shape[0]
  g = next(d for d in range(min(group, n), 0, -1) if n % d == 0)
  grouped = products_NHWC.reshape(n // g, g, *products_NHWC.shape[1:])
  total = grouped[:, 0]
  for k in range(1, g):
    total = total + grouped[:, k]
  return total


depthwise_conv_shifted.defvjp(_shifted_forward, _shifted_backward)


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
