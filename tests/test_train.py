"""End-to-end runs on a tiny dataset: outputs, resume, and the cached-prefix fast path."""

import json
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import numpy as np
import pytest

from configs import default
from tljax import checkpoint, dispatch, evaluate, predict, selection, train
from tljax.data import idx


def tiny_config(data_dir, **overrides):
  config = default.get_config()
  config.data.dir = str(data_dir)
  config.data.name = "mnist"
  config.model.alpha = 0.35
  config.model.weights = "none"
  config.batch_size = 16
  config.eval_batch_size = 40
  config.steps_per_dispatch = 4
  config.checkpoint_every_steps = 4
  config.phases[0].epochs = 2
  config.phases[1].epochs = 1
  config.phases[1].learning_rate = 1e-3
  config.phases[1].batchnorm = "batch_stats"
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[int(p)] if p.isdigit() else target[p]
    target[leaf] = value
  return config


def final_state(workdir):
  ckpt = checkpoint.Checkpointer(workdir)
  step = ckpt.latest_step()
  meta = ckpt.restore_meta(step)
  restored = ckpt.restore_arrays(step)  # Raw arrays, for comparison only.
  ckpt.close()
  return meta, restored["state"]


@pytest.fixture
def uninterrupted(tiny_idx_run):
  return tiny_idx_run


def test_run_writes_every_output(uninterrupted):
  workdir, summary = uninterrupted
  for name in ("metrics.jsonl", "summary.json", "confusion_matrix.png", "samples.png",
               "curves.png", "test_predictions.npz", "trained_variables.msgpack",
               "export/model.jax_exported", "export/model.json"):
    assert (workdir / name).stat().st_size > 0, name
  trained = flax.serialization.msgpack_restore(
      (workdir / "trained_variables.msgpack").read_bytes())
  _, state = final_state(workdir)
  for a, b in zip(jax.tree.leaves(trained),
                  jax.tree.leaves({k: state[k] for k in ("batch_stats", "params")})):
    np.testing.assert_array_equal(a, np.asarray(b))
  saved = json.loads((workdir / "summary.json").read_text())
  recount = np.load(workdir / "test_predictions.npz")
  assert saved["test_accuracy"] == pytest.approx(
      np.mean(recount["labels"] == recount["predictions"]), abs=1e-12)
  assert len(recount["labels"]) == saved["test_examples"] == 40
  report = saved["classification_report"]
  assert [c["support"] for c in report["classes"]] == [4] * 10
  assert report["accuracy"] == pytest.approx(saved["test_accuracy"])
  np.testing.assert_array_equal(np.argmax(recount["probabilities"], 1), recount["predictions"])
  assert report["top5_accuracy"] == pytest.approx(evaluate.top_k_accuracy(
      recount["labels"], recount["probabilities"], 5))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(0 <= r["accuracy"] <= 1 for r in records)  # Step and epoch records alike.
  epochs = [(r["phase"], r["epoch"]) for r in records if r["kind"] == "epoch"]
  assert epochs == [(0, 1), (0, 2), (1, 1)]
  assert all(r["val_accuracy"] is not None for r in records if r["kind"] == "epoch")
  assert [p["name"] for p in saved["phases"]] == ["frozen_base", "fine_tune"]
  assert saved["phases"][0]["trainable_params"] == 1280 * 10 + 10
  assert saved["phases"][0]["cached_prefix"] == ["global_average_pooling2d"]
  # Phase 2's prefix (layers[:100], frozen in phase 1 too) came from phase 1's caching pass.
  assert saved["phases"][1]["cached_prefix"] == ["block_10_project_BN", "block_11_expand_relu"]
  assert [p["prefix_cached_by_previous_phase"] for p in saved["phases"]] == [False, True]


# Imports only jax and numpy: what another program has to load an exported model.
_LOAD_EXPORTED = textwrap.dedent("""
    import json, pathlib, sys
    import jax, numpy as np
    export_dir, images_path, out_path = map(pathlib.Path, sys.argv[1:])
    meta = json.loads((export_dir / "model.json").read_text())
    exported = jax.export.deserialize(bytearray((export_dir / "model.jax_exported").read_bytes()))
    images = np.load(images_path)
    assert images.shape[1:] == tuple(meta["input"]["shape"][1:]), images.shape
    np.save(out_path, np.asarray(exported.call(images.astype(meta["input"]["dtype"]))))
    print(json.dumps(sorted(m for m in ("tljax", "flax", "optax") if m in sys.modules)))
""")


def test_export_round_trips_in_a_process_without_tljax(uninterrupted, tiny_idx_dir, tmp_path):
  workdir, _ = uninterrupted
  meta = json.loads((workdir / "export" / "model.json").read_text())
  assert meta["class_names"] == [str(i) for i in range(10)]
  assert meta["input"] == {"shape": [None, 28, 28], "dtype": "uint8"}
  images = idx.load_idx_folder(tiny_idx_dir, "mnist").test.images[:7]  # Not the eval batch.
  np.save(tmp_path / "images.npy", images)
  loaded = subprocess.run(
      [sys.executable, "-c", _LOAD_EXPORTED, str(workdir / "export"),
       str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
      capture_output=True, text=True, check=True)
  assert json.loads(loaded.stdout) == []
  exported = np.load(tmp_path / "out.npy")
  assert exported.shape == (7, 10) and exported.dtype == np.float32
  # tljax.predict on the same images, every class listed: its full probability vectors.
  run = predict.load_run(workdir)
  rows = predict.predict(run, ((f"image{i}", image) for i, image in enumerate(images)),
                         batch_size=4, top_k=10, progress=False)
  assert [len(r["top_k"]) for r in rows] == [10] * 7
  predicted = np.zeros((7, 10))
  for i, row in enumerate(rows):
    for label, probability in row["top_k"]:
      predicted[i, run.class_names.index(label)] = probability
  np.testing.assert_allclose(exported, predicted, rtol=0, atol=1e-5)
  expected = np.load(workdir / "test_predictions.npz")["probabilities"][:7]
  np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)


def test_restart_after_phase_one_continues_in_phase_two(uninterrupted, tiny_idx_dir,
                                                        tmp_path, monkeypatch):
  workdir = tmp_path / "interrupted"
  original = train.train_phase

  def stop_before_phase_two(ctx, phase, state, global_step):
    if phase.index == 1:
      raise KeyboardInterrupt("simulated crash after the phase-1 checkpoint")
    return original(ctx, phase, state, global_step)

  monkeypatch.setattr(train, "train_phase", stop_before_phase_two)
  with pytest.raises(KeyboardInterrupt):
    train.run(tiny_config(tiny_idx_dir), workdir)
  monkeypatch.setattr(train, "train_phase", original)
  calls = []
  monkeypatch.setattr(train.weights, "load_pretrained",
                      lambda *a, **k: calls.append(a) or pytest.fail("weights reloaded"))
  train.run(tiny_config(tiny_idx_dir), workdir)
  assert not calls
  meta_a, state_a = final_state(uninterrupted[0])
  meta_b, state_b = final_state(workdir)
  assert meta_a["global_step"] == meta_b["global_step"]
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records if r["kind"] == "epoch"] == [0, 0, 1]
  # Resumed in phase 2, the run cached its prefix itself: the same bits as the cache phase 1
  # built for it in the uninterrupted run, since the parameters above are bit-identical.
  resumed = json.loads((workdir / "summary.json").read_text())["phases"][1]
  assert not resumed["prefix_cached_by_previous_phase"]


def test_incompatible_checkpoints_are_refused(uninterrupted, tiny_idx_dir):
  config = tiny_config(tiny_idx_dir)
  config.phases[1].rules = ("freeze:layers[:50]", "train:.*")
  with pytest.raises(checkpoint.CheckpointError, match="another config.*phases"):
    train.run(config, uninterrupted[0])


def test_ema_weights_are_evaluated_and_saved_and_frozen_ones_untouched(tiny_idx_dir, tmp_path,
                                                                       monkeypatch):
  config = tiny_config(tiny_idx_dir)
  config.phases = (default.phase(name="head", epochs=1, ema_decay=0.9,
                                 rules=("train:predictions/.*", "freeze:.*")),)
  initial, evaluated, trained_raw = [], [], []
  load, evaluate_split, select = (train.weights.load_pretrained, dispatch.evaluate_split,
                                  selection.selected_state)
  monkeypatch.setattr(train.weights, "load_pretrained",
                      lambda *a, **k: initial.append(load(*a, **k)) or initial[-1])
  monkeypatch.setattr(dispatch, "evaluate_split", lambda eval_batch, variables, *a: (
      evaluated.append(jax.device_get(variables)) or evaluate_split(eval_batch, variables, *a)))
  monkeypatch.setattr(selection, "selected_state", lambda meta, ckpt, phase, state, *a: (
      trained_raw.append(jax.device_get(state.params)) or select(meta, ckpt, phase, state, *a)))
  summary = train.run(config, tmp_path)
  assert summary["weights_from"]["ema"]
  saved = flax.serialization.msgpack_restore((tmp_path / "trained_variables.msgpack").read_bytes())
  validation = evaluated[0]  # Then the test split, with the same variables.
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(validation)):
    np.testing.assert_array_equal(a, b)
  _, state = final_state(tmp_path)
  averaged = state["opt_state"]["inner_states"]["train"]["inner_state"][1]["ema_params"]
  # No moving average of a frozen weight: their places hold no array.
  assert [path[0].key for path, _ in jax.tree_util.tree_leaves_with_path(averaged)] == \
      ["predictions", "predictions"]
  head = saved["params"].pop("predictions")
  np.testing.assert_array_equal(head["kernel"], averaged["predictions"]["kernel"])
  assert not np.allclose(head["kernel"], trained_raw[0]["predictions"]["kernel"])
  frozen_before = jax.device_get(initial[0]["params"])
  frozen_before.pop("predictions")
  for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(a, b)


def read_events(workdir, files=None):
  """``tag -> [(step, value)]`` of scalars, and the image tags, of every event file (or of
  ``files``, in their order)."""
  from tensorboardX.proto import event_pb2
  scalars, images = {}, set()
  for path in sorted(workdir.glob("events.out.tfevents.*")) if files is None else files:
    blob, position = path.read_bytes(), 0
    while position < len(blob):  # TFRecord: length, its CRC, the event, its CRC.
      length = int.from_bytes(blob[position:position + 8], "little")
      event = event_pb2.Event.FromString(blob[position + 12:position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("image"):
          images.add(value.tag)
        else:
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars, images


def test_tensorboard_events_hold_the_logged_scalars(uninterrupted):
  workdir, _ = uninterrupted
  scalars, images = read_events(workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  dispatches = [r for r in records if r["kind"] == "step"]
  epochs = [r for r in records if r["kind"] == "epoch"]
  for key in ("loss", "accuracy", "learning_rate", "images_per_s"):
    assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                       for r in dispatches], key
  assert {r["learning_rate"] for r in dispatches} == {1e-3}
  assert scalars["validation/accuracy"] == [(r["step"], pytest.approx(r["val_accuracy"]))
                                            for r in epochs]
  assert [step for step, _ in scalars["epoch/loss"]] == [r["step"] for r in epochs]
  assert images == {"test/confusion_matrix"}
