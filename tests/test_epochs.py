"""tljax.epochs: an epoch cut into dispatches, when a checkpoint falls due, the epoch's sums
and the phase's throughput."""

import numpy as np
import pytest

from tljax import epochs


@pytest.mark.parametrize("steps_per_epoch, target, size", [
    (100, 30, 25),   # A divisor within [target/2, target]: every dispatch the same size.
    (100, 100, 100), (8, 4, 4), (10, 4, 2),
    (7, 4, 4),       # None: the target, and a shorter last dispatch.
    (5, 100, 5),     # Never more than an epoch.
])
def test_dispatch_size(steps_per_epoch, target, size):
  assert epochs.dispatch_size(steps_per_epoch, target) == size


@pytest.mark.parametrize("position, sizes", [(0, [4, 4, 2]), (3, [4, 3]), (9, [1])])
def test_dispatches_cover_the_rest_of_the_epoch_in_order(position, sizes):
  order_SB = np.arange(20).reshape(10, 2)
  cut = epochs.dispatches(order_SB, position, 4)
  assert [len(d) for d in cut] == sizes
  np.testing.assert_array_equal(np.concatenate(cut), order_SB[position:])


@pytest.mark.parametrize("global_step, steps, every, epoch_end, due", [
    (4, 4, 4, False, True),    # Reached a multiple.
    (6, 4, 4, False, True),    # Passed one inside the dispatch.
    (7, 2, 4, False, False),   # 5..7: none.
    (8, 4, 4, True, False),    # The epoch's end: the phase saves it.
    (8, 4, 0, False, False),   # Periodic checkpoints off.
    (12, 12, 4, False, True),  # Several multiples: one checkpoint.
])
def test_checkpoint_due(global_step, steps, every, epoch_end, due):
  assert epochs.checkpoint_due(global_step, steps, every, epoch_end) is due


def _metrics(loss, correct):
  loss = np.asarray(loss, np.float32)
  return {"loss": loss, "correct": np.asarray(correct), "finite": np.isfinite(loss)}


def test_epoch_sums_leave_out_skipped_steps_from_the_loss_but_not_the_accuracy():
  sums = epochs.EpochSums()
  assert sums.add(_metrics([1.0, 3.0], [4, 2]), batch_size=4) == (2.0, 0.75)
  loss, accuracy = sums.add(_metrics([np.nan, 5.0], [0, 4]), batch_size=4)
  assert (loss, accuracy) == (5.0, 0.5)
  assert (sums.finite_steps, sums.skipped, sums.correct) == (3, 1, 10)
  assert sums.loss == 3.0 and sums.accuracy(4) == 10 / 16


def test_epoch_sums_of_only_skipped_steps():
  sums = epochs.EpochSums()
  loss, accuracy = sums.add(_metrics([np.nan], [0]), batch_size=2)
  assert np.isnan(loss) and accuracy == 0.0
  assert sums.loss == 0.0 and sums.accuracy(2) == 0.0 and sums.skipped == 1


def test_throughput_leaves_out_the_first_dispatch_and_overlapping_time():
  throughput = epochs.Throughput()
  assert throughput.add(dispatched=0.0, done=10.0, images=64) == 10.0  # Mostly compiling.
  assert throughput.images_per_s is None
  # Dispatched at 9 while the first still ran: it ran from 10, the first one's end.
  assert throughput.add(dispatched=9.0, done=12.0, images=64) == 2.0
  assert throughput.add(dispatched=13.0, done=15.0, images=64) == 2.0
  assert throughput.images_per_s == 128 / 4
