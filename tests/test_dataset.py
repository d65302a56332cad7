"""tljax.data.dataset: splits check their arrays, Keras's validation holdout, take, row views."""

import numpy as np
import pytest

from tljax.data import dataset


def small_split(n, h=4, w=4):
  return dataset.Split((np.arange(n * h * w) % 256).astype(np.uint8).reshape(n, h, w),
                       np.arange(n, dtype=np.int32))


def keras_validation_split(split, fraction, monkeypatch):
  """``model.fit(validation_split=fraction)``'s own cut of ``(images, labels)``."""
  monkeypatch.setenv("KERAS_BACKEND", "jax")
  from keras.src.trainers.data_adapters import array_slicing  # After KERAS_BACKEND is set.
  return array_slicing.train_validation_split((split.images, split.labels), fraction)


@pytest.mark.parametrize("n", [7, 10, 101, 60000])
@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.2, 0.3, 0.35, 0.7])
def test_holdout_split_matches_keras(n, fraction, monkeypatch):
  split = small_split(n)
  (x_train, y_train), (x_val, y_val) = keras_validation_split(split, fraction, monkeypatch)
  train, val = dataset.holdout_split(split, fraction)
  np.testing.assert_array_equal(train.images, x_train)
  np.testing.assert_array_equal(train.labels, y_train)
  np.testing.assert_array_equal(val.images, x_val)
  np.testing.assert_array_equal(val.labels, y_val)


def test_holdout_split_zero_and_bad_fractions():
  split = small_split(10)
  train, val = dataset.holdout_split(split, 0.0)
  assert train is split and len(val) == 0 and val.images.shape == (0, 4, 4)
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=f"fraction {bad} must be in"):
      dataset.holdout_split(split, bad)


@pytest.mark.parametrize("n, fraction", [(3, 0.7), (1, 0.5), (10, 1e-17)])
def test_holdout_split_refuses_an_empty_side_like_keras(n, fraction, monkeypatch):
  split = small_split(n)
  with pytest.raises(ValueError, match="not sufficient"):
    keras_validation_split(split, fraction, monkeypatch)
  with pytest.raises(ValueError, match=f"{n} examples are too few"):
    dataset.holdout_split(split, fraction)


@pytest.mark.parametrize("n, expected", [(0, 10), (3, 3), (10, 10), (25, 10)])
def test_take(n, expected):
  split = dataset.take(small_split(10), n)
  assert len(split) == expected
  np.testing.assert_array_equal(split.labels, np.arange(expected))


def test_take_rejects_negative():
  with pytest.raises(ValueError, match="n=-1 must be >= 0"):
    dataset.take(small_split(3), -1)


def test_split_checks_its_arrays():
  with pytest.raises(ValueError, match="labels must be int32"):
    dataset.Split(np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int64))
  with pytest.raises(ValueError, match="images must be uint8"):
    dataset.Split(np.zeros((3, 4), np.uint8), np.zeros(3, np.int32))


def test_row_view_reads_only_when_indexed():
  images = np.random.default_rng(0).integers(0, 255, (10, 4, 4, 3), np.uint8)
  view = dataset.RowView(images, np.array([7, 2, 5]))
  assert view.shape == (3, 4, 4, 3) and view.dtype == np.uint8 and len(view) == 3
  assert isinstance(view[1:], dataset.RowView) and len(view[1:]) == 2
  np.testing.assert_array_equal(view[np.array([2, 0])], images[[5, 7]])


def test_dataset_needs_a_name_for_every_class():
  split = small_split(3)
  with pytest.raises(ValueError, match=r"digits: 2 class names for num_classes=3"):
    dataset.Dataset(split, split, 3, ("a", "b"), "digits", identity="x")


def test_content_digest_changes_with_one_pixel_or_label():
  split = small_split(4)
  digest = dataset.content_digest(split, split)
  assert digest == dataset.content_digest(small_split(4), small_split(4))
  assert len(digest) == 64 and int(digest, 16) >= 0
  images = split.images.copy()
  images[3, 3, 3] ^= 1
  labels = split.labels.copy()
  labels[0] = 3
  assert len({digest, dataset.content_digest(split, dataset.Split(images, split.labels)),
              dataset.content_digest(split, dataset.Split(split.images, labels)),
              dataset.content_digest(split)}) == 4
