"""What a finished run writes to its workdir: the test evaluation and classification report,
the trained variables, the exported model files (each checked in its own runtime), plots and
``summary.json``."""

import json
import logging
import math
from typing import Any

import flax.serialization
import jax
import numpy as np

from tljax import calibration, dispatch, distributed, evaluate, export, files, freezing, plots
from tljax import prefix, reporting, steps, tensorboard
from tljax import report as report_page


def write_outputs(workdir, config, dataset, splits, model, variables, view, test_source, mesh,
                  phase_results, validation_source=None, audited=None) -> dict[str, Any]:
  """The temperature (``config.calibrate``: fitted on ``validation_source``, recorded in
  summary.json and folded into the head of the model evaluated and exported), test
  evaluation, then (on process 0) the trained variables, the exported model, the plots,
  summary.json (with ``audited``, the data audit's summary, as its ``audit``) and
  report.html."""
  test = splits["test"]
  eval_batch = dispatch.make_eval_batch(model, 0, view, mesh)
  temperature, validation_probabilities = _fit_temperature(
      config, eval_batch, variables, splits["validation"], validation_source)
  calibrated = calibration.calibrated_variables(model, variables, temperature or 1.0)
  loss, accuracy, predictions, probabilities = dispatch.evaluate_split(
      eval_batch, calibrated, test_source, config.eval_batch_size)
  if not math.isfinite(loss):
    raise steps.NonFiniteError(f"the test loss is {loss}: the trained model computes non-finite "
                               "values, so no outputs were written. Train again in a new "
                               "--workdir with a lower learning rate, or check the inputs.")
  cm = evaluate.confusion_matrix(test.labels, predictions, dataset.num_classes)
  report = evaluate.classification_report(cm, dataset.class_names, labels=test.labels,
                                          probabilities=probabilities)
  logging.info("test loss %.4f, test accuracy %.4f\n%s", loss, accuracy,
               evaluate.format_classification_report(report))
  summary = {"test_loss": loss, "test_accuracy": accuracy, "test_examples": len(test.labels),
             "image_shape": list(test.images.shape[1:]),
             "weights_from": phase_results[-1]["weights_from"],
             "classification_report": report,
             "calibration": calibration.summary(temperature, validation_probabilities,
                                                splits["validation"].labels, probabilities,
                                                test.labels),
             "dataset": dataset.name, "class_names": list(dataset.class_names),
             "split_sizes": {name: len(split) for name, split in splits.items()},
             "skipped_images": list(dataset.skipped),
             "phases": phase_results, "devices": [str(d) for d in jax.devices()],
             "processes": jax.process_count(),
             "audit": audited, "config": json.loads(config.to_json_best_effort())}
  if audited and audited["warning"]:
    logging.warning("audit: %s", audited["warning"])
  if not distributed.is_main_process():
    return summary
  with files.atomic_open(workdir / "trained_variables.msgpack", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(dict(variables))))
  summary["export"] = export.write(
      workdir / "export", model, calibrated, view, dataset.class_names, test.images.shape[1:],
      formats=config.export.formats, int8=config.export.int8,
      calibration_images=splits["train"].images, test_images=test.images,
      test_labels=test.labels, validation_images=splits["validation"].images,
      validation_labels=splits["validation"].labels, max_int8_drop=config.export.max_int8_drop,
      test_probabilities=probabilities if config.model.dtype == "float32" else None,
      # The temperature fit's pass over the validation split, calibrated as the export is.
      validation_probabilities=(
          calibration.with_temperature(validation_probabilities, temperature)
          if validation_probabilities is not None and config.model.dtype == "float32"
          else None),
      temperature=temperature)
  _write_plots(workdir, config, dataset, test, cm, predictions, probabilities,
               summary["calibration"])
  files.write_json(workdir / "summary.json", summary)
  report_page.write_report(workdir)
  return summary


def _write_plots(workdir, config, dataset, test, cm, predictions, probabilities,
                 calibration_summary):
  """The test predictions, confusion matrix, samples, top losses, reliability diagram (from
  ``calibration_summary``) and curves, and the confusion matrix in TensorBoard."""
  np.savez(workdir / "test_predictions.npz", labels=test.labels, predictions=predictions,
           probabilities=probabilities)
  plots.plot_confusion_matrix(cm, dataset.class_names, workdir / "confusion_matrix.png")
  picked = evaluate.pick_samples(test.labels, predictions, n=9, seed=config.seed)
  plots.plot_samples(test.images[picked], test.labels[picked], predictions[picked],
                     dataset.class_names, workdir / "samples.png")
  plots.plot_top_losses(test.images, test.labels, probabilities, dataset.class_names,
                        workdir / "top_losses.png")
  plots.plot_reliability(calibration.diagram_curves(calibration_summary, probabilities),
                         test.labels, workdir / "reliability.png")
  epochs = [r for r in reporting.read_metrics(workdir / "metrics.jsonl") if r["kind"] == "epoch"]
  plots.plot_curves(epochs, workdir / "curves.png")
  if config.tensorboard:
    with tensorboard.EventWriter(workdir) as events:
      events.add_image("test/confusion_matrix", workdir / "confusion_matrix.png",
                       epochs[-1]["step"] if epochs else 0)


def _fit_temperature(config, eval_batch, variables, validation, validation_source):
  """``(temperature, validation probabilities)`` fitted on the validation split, or
  ``(None, None)`` where ``config.calibrate`` is off or there is no validation split."""
  if not (config.calibrate and validation_source is not None and len(validation)):
    return None, None
  *_, probabilities = dispatch.evaluate_split(eval_batch, variables, validation_source,
                                              config.eval_batch_size)
  return calibration.fit_temperature(probabilities, validation.labels), probabilities


def phase_results(phase, model, cut: int, handed_over: bool, *, wall_s: float,
                  images_per_s: float | None, weights_from: dict[str, Any],
                  stopped_after: int | None) -> dict[str, Any]:
  """A trained phase's entry in the summary: its parameters, the prefix it cached (``cut``;
  ``handed_over`` where the previous phase cached it), its time, throughput, the weights it
  hands on and the epoch it stopped early after (None: it did not)."""
  return {
      "name": phase.name, "epochs": phase.config.epochs, "wall_s": wall_s,
      "train_images_per_s": images_per_s,
      "trainable_params": sum(r.size for r in phase.reports if r.rule.action == freezing.TRAIN),
      "frozen_params": sum(r.size for r in phase.reports if r.rule.action == freezing.FREEZE),
      "cached_prefix": list(prefix.frontier(model.layers, cut)) if cut else None,
      "prefix_cached_by_previous_phase": handed_over, "batchnorm": phase.config.batchnorm,
      "weights_from": weights_from, "stopped_early_after_epoch": stopped_after}
