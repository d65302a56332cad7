"""tljax.data.sources: a split streamed from its decoded cache feeds the same batches as the
split held on the device, and a streamed run trains, resumes and ends bit for bit as one in
memory."""

import os
import signal

import flax.serialization
import jax
import numpy as np
import pytest

from test_folder import tiny_folder_config
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


def test_row_view_reads_only_when_indexed():
  split = _split()
  view = dataset.RowView(split.images, np.array([7, 2, 5]))
  assert view.shape == (3, 4, 4, 3) and view.dtype == np.uint8 and len(view) == 3
  assert isinstance(view[1:], dataset.RowView) and len(view[1:]) == 2
  np.testing.assert_array_equal(view[np.array([2, 0])], split.images[[5, 7]])


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
