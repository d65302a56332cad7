"""Micro-batches: how many images run at a time, that every row comes back in its place and
that totals sum every micro-batch."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models import microbatch


@pytest.mark.parametrize("batch, side, expected", [
    (32, 160, 4), (32, 224, 2), (32, 96, 8), (32, 32, 32), (500, 160, 5), (7, 160, 1),
    (2, 512, 1)])
def test_size_is_the_largest_divisor_within_the_pixel_budget(batch, side, expected):
  assert microbatch.size(batch, side * side) == expected


def test_apply_keeps_rows_in_place_and_each_device_on_its_own_block():
  x = jnp.arange(12 * 4 * 4 * 1, dtype=jnp.float32).reshape(12, 4, 4, 1)
  inputs = {"map": x, "row": jnp.arange(12)}

  def fn(tree):  # Per example; records which rows shared a micro-batch.
    return {"first": tree["map"][:, 0, 0, 0], "row": tree["row"],
            "together": jnp.broadcast_to(jnp.min(tree["row"]), tree["row"].shape)}

  with mock.patch.object(microbatch, "PIXELS", 2 * 16):  # 2 examples a device at a time.
    out = jax.jit(lambda t: microbatch.apply(fn, t, shards=2))(inputs)
    jaxpr = str(jax.make_jaxpr(lambda t: microbatch.apply(fn, t, shards=2))(inputs))
  assert "scan" in jaxpr
  np.testing.assert_array_equal(out["first"], x[:, 0, 0, 0])
  np.testing.assert_array_equal(out["row"], np.arange(12))
  # Blocks of 6 rows, one a device: each micro-batch takes 2 rows of each block.
  np.testing.assert_array_equal(out["together"], [0, 0, 2, 2, 4, 4, 0, 0, 2, 2, 4, 4])


def test_accumulate_sums_every_micro_batch_of_images_of_the_given_size():
  x = jnp.arange(8.0).reshape(8, 1, 1, 1)  # Cached maps of 1x1, from 4x4 images.
  fn = lambda x: {"sum": jnp.sum(x), "count": x.shape[0]}
  with mock.patch.object(microbatch, "PIXELS", 2 * 16):
    total = microbatch.accumulate(fn, x, shards=2, pixels=16)
    jaxpr = str(jax.make_jaxpr(lambda x: microbatch.accumulate(fn, x, shards=2, pixels=16))(x))
  assert "scan" in jaxpr
  assert float(total["sum"]) == 28.0 and int(total["count"]) == 8


def test_pooled_features_run_whole():
  with mock.patch.object(microbatch, "PIXELS", 1):
    jaxpr = jax.make_jaxpr(lambda x: microbatch.apply(lambda x: 2 * x, x, shards=1, pixels=16))
    assert "scan" not in str(jaxpr(jnp.ones((8, 1280))))


def test_apply_runs_the_whole_batch_when_it_fits():
  fn = lambda x: x * 2
  x = jnp.ones((4, 8, 8, 3))
  assert "scan" not in str(jax.make_jaxpr(lambda x: microbatch.apply(fn, x, shards=1))(x))
