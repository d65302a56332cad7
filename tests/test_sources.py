"""tljax.data.sources: a split streamed from its decoded cache feeds the same batches as the
split held on the device, and a streamed run trains, resumes and ends bit for bit as one in
memory; an epoch's order is a reproducible permutation."""

import os
import signal

import flax.serialization
import jax
import numpy as np
import pytest

from helpers import tiny_folder_config
from tljax import preemption, reporting, sharding, train
from tljax.data import dataset, sources

MESH = sharding.data_mesh(jax.devices()[:1])


def _split(n=10):
  images = np.random.default_rng(0).integers(0, 255, (n, 4, 4, 3), np.uint8)
  return dataset.Split(images, np.arange(n, dtype=np.int32) % 3)


@jax.jit
def _gathered(inputs, labels, indices):
  return inputs["images"][indices], labels[indices]


def test_streamed_batches_are_the_device_batches():
  split = _split()
  streamed = dataset.Split(dataset.RowView(split.images, np.arange(10)), split.labels)
  device, stream = (sources.DeviceSource.of(split, MESH),
                    sources.StreamSource(streamed, MESH))
  order = np.array([[3, 1, 4], [1, 5, 9]], np.int32)
  stream.prefetch(order)
  for source in (device, stream):
    images, labels = _gathered(*source.train_batches(order))
    np.testing.assert_array_equal(images, split.images[order])
    np.testing.assert_array_equal(labels, split.labels[order])
  evaluated = [[(np.asarray(_gathered(inputs, labels, indices)[1]), np.asarray(mask))
                for inputs, labels, indices, mask in source.eval_batches(4)]
               for source in (device, stream)]
  for (labels_a, mask_a), (labels_b, mask_b) in zip(*evaluated):
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(labels_a[mask_a], labels_b[mask_b])


def test_epoch_order_is_a_reproducible_permutation_cut_into_batches():
  order = sources.epoch_order(0, 1, 2, 1000, 33, 30)
  assert order.dtype == np.int32 and order.shape == (33, 30)
  assert len(np.unique(order)) == 990 and order.min() >= 0 and order.max() < 1000
  np.testing.assert_array_equal(order, sources.epoch_order(0, 1, 2, 1000, 33, 30))
  for other in [(1, 1, 2), (0, 0, 2), (0, 1, 3)]:
    assert not np.array_equal(order, sources.epoch_order(*other, 1000, 33, 30))


def test_epoch_order_is_jax_random_permutation_of_the_phase_and_epoch_key():
  """The order of earlier builds (a device permutation), so runs and resumes keep theirs."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 1), 4)
  expected = np.asarray(jax.random.permutation(key, 100))[:96].reshape(8, 12)
  np.testing.assert_array_equal(sources.epoch_order(7, 1, 4, 100, 8, 12), expected)


def test_streamed_run_stopped_mid_epoch_ends_as_the_run_in_memory(tiny_folder_run, tmp_path,
                                                                   monkeypatch):
  root, reference, _ = tiny_folder_run
  config = tiny_folder_config(root, stream="on")
  write = reporting.MetricsWriter.write

  def write_then_stop(self, record):  # SIGTERM as step 4 of 6 is recorded; 5 is in flight.
    write(self, record)
    if record["kind"] == "step" and record["step"] == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(reporting.MetricsWriter, "write", write_then_stop)
  with pytest.raises(preemption.Preempted, match="checkpoint 5 is saved"):
    train.run(config, tmp_path)
  monkeypatch.undo()
  train.run(config, tmp_path)
  read = lambda workdir: flax.serialization.msgpack_restore(
      (workdir / "trained_variables.msgpack").read_bytes())
  for a, b in zip(jax.tree.leaves(read(tmp_path)), jax.tree.leaves(read(reference))):
    np.testing.assert_array_equal(a, b)
