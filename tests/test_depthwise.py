"""Tests of tljax.models.depthwise: both implementations compute the same function."""

import functools

import jax
import numpy as np
import pytest

from tljax.models import depthwise

TOLERANCE = 1e-5


def _inputs(height, width, kernel_size, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, 5), np.float32)
  kernel = rng.standard_normal((kernel_size, kernel_size, 5, 1), np.float32)
  return x, kernel, rng


@functools.partial(jax.jit, static_argnames=("conv", "stride", "padding"))
def _outputs_and_gradients(conv, x, kernel, cotangent, stride, padding):
  """``conv``'s outputs and the gradients of ``sum(outputs * cotangent)`` w.r.t. input, kernel."""
  out, vjp = jax.vjp(lambda x, kernel: conv(x, kernel, stride, padding), x, kernel)
  return out, *vjp(cotangent)


def _check_against_xla(x, kernel, rng, stride, padding):
  out_shape = jax.eval_shape(functools.partial(depthwise.depthwise_conv_xla, stride=stride,
                                               padding=padding), x, kernel).shape
  cotangent = rng.standard_normal(out_shape, np.float32)
  expected = _outputs_and_gradients(depthwise.depthwise_conv_xla, x, kernel, cotangent,
                                    stride, padding)
  actual = _outputs_and_gradients(depthwise.depthwise_conv_shifted, x, kernel, cotangent,
                                  stride, padding)
  for name, a, e in zip(("output", "input gradient", "kernel gradient"), actual, expected):
    assert a.shape == e.shape, name
    np.testing.assert_allclose(a, e, atol=TOLERANCE, rtol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding, height, width, kernel_size", [
    *[(padding, *shape) for padding in ("SAME", "VALID")
      for shape in [(8, 8, 3), (7, 7, 3), (7, 10, 3), (9, 6, 5)]],
    # Maps as small as the last blocks' at 32x32 input, where some taps read only padding.
    ("SAME", 1, 1, 3), ("SAME", 2, 2, 3), ("SAME", 1, 2, 3), ("SAME", 3, 3, 5)])
def test_shifted_matches_xla_outputs_and_gradients(stride, padding, height, width, kernel_size):
  _check_against_xla(*_inputs(height, width, kernel_size), stride, padding)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [7, 24])  # One group of 7; three of 8.
def test_kernel_gradient_sums_every_batch_group(batch, stride):
  _check_against_xla(*_inputs(6, 6, 3, batch=batch), stride, "SAME")


@pytest.mark.parametrize("impl", ["shifted", "xla"])
def test_output_size_follows_padding_and_stride(impl):
  x, kernel, _ = _inputs(7, 10, 3)

  def shape(stride, padding):
    conv = functools.partial(depthwise.depthwise_conv, stride=stride, padding=padding, impl=impl)
    return jax.eval_shape(conv, x, kernel).shape

  assert shape(2, "SAME") == (2, 4, 5, 5)
  assert shape(2, "VALID") == (2, 3, 4, 5)
  assert shape(1, "VALID") == (2, 5, 8, 5)
  assert shape(1, "SAME") == (2, 7, 10, 5)


@pytest.mark.parametrize("impl", ["shifted", "xla"])
def test_depthwise_conv_dispatches_to_the_named_implementation(impl, monkeypatch):
  calls = []
  for name in ("shifted", "xla"):
    original = getattr(depthwise, f"depthwise_conv_{name}")
    monkeypatch.setattr(depthwise, f"depthwise_conv_{name}",
                        lambda *a, name=name, original=original: calls.append(name) or original(*a))
  x, kernel, _ = _inputs(8, 8, 3)
  conv = functools.partial(depthwise.depthwise_conv, stride=1, padding="SAME", impl=impl)
  assert jax.eval_shape(conv, x, kernel).shape == (2, 8, 8, 5)
  assert calls == [impl]


@pytest.mark.parametrize("impl, backend, expected", [
    ("auto", "cpu", "shifted"), ("auto", "gpu", "xla"), ("auto", "tpu", "xla"),
    ("shifted", "gpu", "shifted"), ("xla", "cpu", "xla"), ("shifted", None, "shifted"),
])
def test_resolve_impl(impl, backend, expected):
  assert depthwise.resolve_impl(impl, backend) == expected


def test_resolve_impl_auto_uses_the_default_backend():
  expected = "shifted" if jax.default_backend() == "cpu" else "xla"
  assert depthwise.resolve_impl("auto") == expected


@pytest.mark.parametrize("impl", ["fast", "XLA", ""])
def test_resolve_impl_rejects_unknown_names(impl):
  with pytest.raises(ValueError, match=f"depthwise implementation '{impl}' is not one of"):
    depthwise.resolve_impl(impl, "cpu")
