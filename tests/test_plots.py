"""Tests of tljax.plots: what each figure shows, and the PNG files written."""

import os

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from tljax import calibration, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["cat", "dog", "bird"]
CM = np.array([[50, 2, 0], [5, 40, 5], [0, 0, 48]])  # 138 of 150 right


def _assert_only_png(tmp_path, name: str) -> None:
  """``name`` is a valid PNG of sane size and the only file in ``tmp_path``."""
  assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left
  path = tmp_path / name
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  height, width, channels = matplotlib.image.imread(path).shape
  assert 200 <= height <= 2000 and 200 <= width <= 2000 and channels == 4


def _color(name) -> tuple[float, ...]:
  return matplotlib.colors.to_rgba(name)


# ---------------------------------------------------------------- confusion matrix


def test_plot_confusion_matrix_writes_png(tmp_path):
  path = plots.plot_confusion_matrix(CM, CLASS_NAMES, tmp_path / "cm.png")
  assert path == os.fspath(tmp_path / "cm.png")
  _assert_only_png(tmp_path, "cm.png")


def test_confusion_matrix_figure_annotates_every_cell():
  ax = plots.confusion_matrix_figure(CM, CLASS_NAMES, title="Test").axes[0]
  assert ax.get_title() == "Test (accuracy 92.00%)"
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted label", "True label")
  assert [t.get_text() for t in ax.get_xticklabels()] == CLASS_NAMES
  assert [t.get_text() for t in ax.get_yticklabels()] == CLASS_NAMES
  cells = {(t.get_position()[1], t.get_position()[0]): t for t in ax.texts}  # (row, col)
  assert {cell: t.get_text() for cell, t in cells.items()} == {
      (row, col): str(count) for (row, col), count in np.ndenumerate(CM)}
  # Readable on the dark (large count) and light (zero) ends of the colour map.
  assert _color(cells[0, 0].get_color()) == _color("white")
  assert _color(cells[0, 2].get_color()) == _color("black")


@pytest.mark.parametrize("cm, names, match", [
    (np.zeros((2, 3)), ["a", "b"], r"square confusion matrix, got shape \(2, 3\)"),
    (CM, ["a", "b"], "got 2 class names for a 3-class"),
    (np.zeros((3, 3), int), CLASS_NAMES, "counts no examples"),
])
def test_confusion_matrix_figure_rejects_bad_input(cm, names, match):
  with pytest.raises(ValueError, match=match):
    plots.confusion_matrix_figure(cm, names)


# ---------------------------------------------------------------- sample grid

SAMPLE_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
SAMPLE_PREDICTIONS = np.array([0, 1, 2, 1, 1, 2, 0, 0, 2])  # samples 3 and 7 wrong


@pytest.mark.parametrize("shape", [(9, 12, 10), (9, 12, 10, 1), (9, 12, 10, 3)])
def test_plot_samples_writes_png_for_grey_and_rgb(tmp_path, shape):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  path = plots.plot_samples(images, SAMPLE_LABELS, SAMPLE_PREDICTIONS, CLASS_NAMES,
                            tmp_path / "samples.png")
  assert path == os.fspath(tmp_path / "samples.png")
  _assert_only_png(tmp_path, "samples.png")


def test_samples_figure_marks_wrong_predictions():
  images = np.zeros((9, 8, 8), np.uint8)
  figure = plots.samples_figure(images, SAMPLE_LABELS, SAMPLE_PREDICTIONS, CLASS_NAMES)
  assert len(figure.axes) == 9
  assert figure.axes[3].get_title() == "true: cat / pred: dog"
  assert figure.axes[0].get_title() == "true: cat / pred: cat"
  for i, ax in enumerate(figure.axes):
    wrong = i in (3, 7)
    expected = _color("tab:red" if wrong else "tab:green")
    assert _color(ax.title.get_color()) == expected
    assert all(spine.get_visible() == wrong for spine in ax.spines.values())
    if wrong:
      assert _color(ax.spines["top"].get_edgecolor()) == expected


def test_samples_figure_grid_is_square_for_fewer_images():
  figure = plots.samples_figure(np.zeros((4, 8, 8), np.uint8), [0] * 4, [0] * 4, CLASS_NAMES)
  assert figure.axes[0].get_subplotspec().get_geometry()[:2] == (2, 2)


@pytest.mark.parametrize("images, labels, error, match", [
    (np.zeros((9, 8, 8), np.float32), SAMPLE_LABELS, TypeError, "uint8.*float32"),
    (np.zeros((9, 8, 8, 2), np.uint8), SAMPLE_LABELS, ValueError, r"got \(9, 8, 8, 2\)"),
    (np.zeros((0, 8, 8), np.uint8), SAMPLE_LABELS[:0], ValueError, "N >= 1"),
    (np.zeros((8, 8, 8), np.uint8), SAMPLE_LABELS, ValueError, "got 8 images, 9 labels"),
    (np.zeros((9, 8, 8), np.uint8), SAMPLE_LABELS + 1, ValueError, r"\[0, 3\) to name"),
])
def test_samples_figure_rejects_bad_input(images, labels, error, match):
  with pytest.raises(error, match=match):
    plots.samples_figure(images, labels, SAMPLE_PREDICTIONS, CLASS_NAMES)


# ---------------------------------------------------------------- training curves


def _records():
  """Two phases: 3 epochs validated on odd epochs only, then 2 never validated."""
  frozen = [{"phase": 0, "phase_name": "frozen_base", "epoch": e, "loss": 1.0 / e,
             "accuracy": 0.5 + 0.1 * e, "val_loss": 1.2 / e if e % 2 else None,
             "val_accuracy": 0.4 + 0.1 * e if e % 2 else None} for e in (1, 2, 3)]
  fine_tune = [{"phase": 1, "phase_name": "fine_tune", "epoch": e, "loss": 0.1 / e,
                "accuracy": 0.9, "val_loss": None, "val_accuracy": None} for e in (1, 2)]
  return frozen + fine_tune


def test_plot_curves_writes_png(tmp_path):
  path = plots.plot_curves(_records(), tmp_path / "curves.png")
  assert path == os.fspath(tmp_path / "curves.png")
  _assert_only_png(tmp_path, "curves.png")


def _labelled_lines(ax) -> dict[str, tuple[list, list]]:
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
          for line in ax.lines if not line.get_label().startswith("_")}


def test_curves_figure_numbers_epochs_across_phases_and_marks_phases():
  loss_ax, accuracy_ax = plots.curves_figure(_records()).axes
  assert (loss_ax.get_title(), accuracy_ax.get_title()) == ("Loss", "Accuracy")
  loss = _labelled_lines(loss_ax)
  np.testing.assert_allclose(loss["train"], [[1, 2, 3, 4, 5], [1, 1 / 2, 1 / 3, 0.1, 0.05]])
  np.testing.assert_allclose(loss["validation"], [[1, 3], [1.2, 0.4]])
  np.testing.assert_allclose(_labelled_lines(accuracy_ax)["validation"], [[1, 3], [0.5, 0.7]])
  for ax in (loss_ax, accuracy_ax):
    phase_lines = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in phase_lines] == [0.5, 3.5]
    assert [t.get_text() for t in ax.texts] == ["frozen_base", "fine_tune"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]


def test_curves_figure_without_validation_or_phase_names():
  records = [{"phase": p, "epoch": 1, "loss": 0.5, "accuracy": 0.8} for p in (0, 1)]
  loss_ax, _ = plots.curves_figure(records).axes
  assert list(_labelled_lines(loss_ax)) == ["train"]
  assert [t.get_text() for t in loss_ax.texts] == ["phase 0", "phase 1"]


def test_curves_figure_keeps_the_last_record_of_a_repeated_epoch():
  records = _records()
  resumed = dict(records[2], loss=7.0)  # epoch 3 of phase 0 run again after a restart
  loss_ax, _ = plots.curves_figure(records + [resumed]).axes
  np.testing.assert_allclose(_labelled_lines(loss_ax)["train"][1], [1, 1 / 2, 7, 0.1, 0.05])


def test_curves_figure_rejects_bad_records():
  with pytest.raises(ValueError, match="records is empty"):
    plots.curves_figure([])
  with pytest.raises(ValueError, match=r"records\[1\] lacks \['epoch'\]"):
    plots.curves_figure([{"phase": 0, "epoch": 1}, {"phase": 0, "loss": 1.0}])


# ---------------------------------------------------------------- top losses and reliability

TOP_PROBABILITIES = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1],
                              [0.05, 0.9, 0.05]])
TOP_LABELS = np.array([0, 0, 1, 0])  # Losses: -log of 0.7, 0.1, 0.6, 0.05.


def test_top_losses_figure_shows_the_highest_losses_first_with_their_classes():
  images = np.arange(4, dtype=np.uint8)[:, None, None] * np.ones((4, 8, 8), np.uint8)
  figure = plots.top_losses_figure(images, TOP_LABELS, TOP_PROBABILITIES, CLASS_NAMES,
                                   np.array([3, 1, 2]))
  titles = [ax.get_title() for ax in figure.axes]
  assert titles == [f"dog / cat\n{-np.log(0.05):.2f} / 0.90",
                    f"bird / cat\n{-np.log(0.1):.2f} / 0.80",
                    f"dog / dog\n{-np.log(0.6):.2f} / 0.60"]
  assert [int(ax.get_images()[0].get_array()[0, 0]) for ax in figure.axes] == [3, 1, 2]
  assert [_color(ax.title.get_color()) for ax in figure.axes] == [
      _color("tab:red"), _color("tab:red"), _color("tab:green")]


def test_plot_top_losses_and_reliability_write_pngs(tmp_path):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  plots.plot_top_losses(images, TOP_LABELS, TOP_PROBABILITIES, CLASS_NAMES,
                        tmp_path / "top_losses.png", n=3)
  _assert_only_png(tmp_path, "top_losses.png")
  (tmp_path / "top_losses.png").unlink()
  curves = {"before": TOP_PROBABILITIES,
            "after": calibration.with_temperature(TOP_PROBABILITIES, 2.0)}
  plots.plot_reliability(curves, TOP_LABELS, tmp_path / "reliability.png")
  _assert_only_png(tmp_path, "reliability.png")


def test_reliability_figure_plots_accuracy_per_filled_bin():
  figure = plots.reliability_figure({"model": TOP_PROBABILITIES}, TOP_LABELS)
  (ax,) = figure.axes
  diagonal, curve = ax.get_lines()
  table = calibration.reliability_bins(TOP_PROBABILITIES, TOP_LABELS)
  filled = table["count"] > 0
  np.testing.assert_allclose(curve.get_xdata(), table["confidence"][filled])
  np.testing.assert_allclose(curve.get_ydata(), table["accuracy"][filled])
  assert sorted(curve.get_xdata()) == [0.6, 0.7, 0.8, 0.9]
  ece = calibration.expected_calibration_error(TOP_PROBABILITIES, TOP_LABELS)
  assert curve.get_label() == f"model (ECE {ece:.4f})"
