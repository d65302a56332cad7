"""tljax.resume: where a run starts. The newest good checkpoint of the config, in whatever
phase it was (mid-phase: its state; at a phase's end: the next phase from its weights), else
the pretrained weights; another config's checkpoints are refused and left untouched."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import override, read_variables, saved_checkpoint, tiny_config
from tljax import checkpoint, checks, models, phases, resume, sharding, train

MESH = sharding.data_mesh()


@functools.cache
def _tiny_run():
  """tiny_config, its model, the model's abstract variables and its phases on tiny_idx_dir's
  128 training images."""
  config = tiny_config("unused")
  model = models.create(config.model, 10)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  return config, model, abstract, phases.build_phases(config, model, abstract["params"], 128)


def _start(workdir, fingerprint, monkeypatch, all_phases=None):
  """``resume.start`` of the tiny run (or of ``all_phases``) in ``workdir``; the pretrained
  weights are never loaded."""
  config, model, abstract, tiny_phases = _tiny_run()
  all_phases = all_phases or tiny_phases
  monkeypatch.setattr(resume.weights, "load_pretrained", lambda *a, **k: pytest.fail(
      "the pretrained weights were loaded"))
  checkpointer = checkpoint.Checkpointer(workdir)
  try:
    return resume.start(checkpointer, fingerprint, config, model, all_phases, abstract, MESH)
  finally:
    checkpointer.close()


def _copy_checkpoint(run_dir, step, workdir):
  shutil.copytree(run_dir / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
  return workdir


def test_a_finished_run_starts_after_its_last_phase_with_its_weights(tiny_idx_run, tmp_path,
                                                                     monkeypatch):
  step, meta, _ = saved_checkpoint(tiny_idx_run[0])
  workdir = _copy_checkpoint(tiny_idx_run[0], step, tmp_path)
  start = _start(workdir, meta["fingerprint"], monkeypatch)
  assert (start.phase, start.state, step) == (2, None, 24)
  assert start.meta["global_step"] == 24 and start.meta["phase"] == 1
  assert [r["name"] for r in start.meta["results"]] == ["frozen_base", "fine_tune"]
  for a, b in zip(jax.tree.leaves(read_variables(tiny_idx_run[0])),
                  jax.tree.leaves({k: start.variables[k] for k in ("batch_stats", "params")})):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_a_mid_phase_checkpoint_resumes_its_state(tiny_idx_run, tmp_path, monkeypatch):
  step, meta, saved = saved_checkpoint(tiny_idx_run[0], 20)
  workdir = _copy_checkpoint(tiny_idx_run[0], 20, tmp_path)
  start = _start(workdir, meta["fingerprint"], monkeypatch)
  assert (start.phase, start.variables) == (1, None)
  assert (int(start.state.step), start.meta["phase_step"], start.meta["global_step"]) == (4, 4, 20)
  np.testing.assert_array_equal(start.state.params["Conv_1"]["kernel"],
                                saved["params"]["Conv_1"]["kernel"])
  np.testing.assert_array_equal(start.state.rng, saved["rng"])


def test_no_checkpoint_starts_from_the_pretrained_weights(tmp_path, monkeypatch):
  config = tiny_config("unused", **{"model.weights": "imagenet", "seed": 5})
  loaded = []

  def load_pretrained(spec, model, *, input_size, rng, cache_dir):
    loaded.append((spec, input_size, np.asarray(rng).tolist(), cache_dir))
    return {"params": {"w": np.ones(2)}, "batch_stats": {}}

  model = _tiny_run()[1]
  monkeypatch.setattr(resume.weights, "load_pretrained", load_pretrained)
  checkpointer = checkpoint.Checkpointer(tmp_path)
  start = resume.start(checkpointer, {"seed": 5}, config, model, (), None, MESH)
  checkpointer.close()
  assert loaded == [("imagenet", 32, np.asarray(jax.random.PRNGKey(5)).tolist(), None)]
  assert (start.phase, start.state) == (0, None)
  assert start.meta == {"fingerprint": {"seed": 5}, "results": [], "global_step": 0,
                        "phase": 0, "phase_step": 0}
  np.testing.assert_array_equal(start.variables["params"]["w"], np.ones(2))


def test_another_configs_checkpoints_are_refused_and_left_untouched(tiny_idx_run, tmp_path,
                                                                    monkeypatch):
  step, meta, _ = saved_checkpoint(tiny_idx_run[0])
  workdir = _copy_checkpoint(tiny_idx_run[0], step, tmp_path)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"^{workdir}/checkpoints holds checkpoints of another config \(differs in "
      r"\['batch_size', 'seed'\]\); they are left untouched\.")):
    _start(workdir, {**meta["fingerprint"], "seed": 1, "batch_size": 8}, monkeypatch)
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before

@pytest.mark.parametrize("step, overrides, num_train, message", [
    # Phase 0 finished with 2 epochs; the config now says 1.
    (24, {"phases.0.epochs": 1}, 128, r"^phases\[0\] \('frozen_base'\): epochs=1, but this "
     r"phase already finished with epochs=2 \(checkpoint .*/checkpoints/24\)\. Rerun with "
     r"epochs=2 to resume, or use a new --workdir to train it with 1\.$"),
    # The same for the last phase, with more epochs: it would train a finished phase again.
    (24, {"phases.1.epochs": 3}, 128, r"^phases\[1\] \('fine_tune'\): epochs=3, but this "
     r"phase already finished with epochs=1"),
    # Step 4 of the fine-tune, which on 32 training images is 2 steps long.
    (20, {}, 32, r"^phases\[1\] \('fine_tune'\): epochs=1 makes the phase 2 steps long \(2 "
     r"an epoch\), but checkpoint .*/checkpoints/20 is at its step 4 \(2 epochs trained\)\."),
])
def test_a_resume_whose_phases_no_longer_hold_what_was_trained_is_refused(
    tiny_idx_run, tmp_path, monkeypatch, step, overrides, num_train, message):
  _, meta, _ = saved_checkpoint(tiny_idx_run[0], step)
  workdir = _copy_checkpoint(tiny_idx_run[0], step, tmp_path)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  _, model, abstract, _ = _tiny_run()
  config = override(tiny_config("unused"), **overrides)
  changed = phases.build_phases(config, model, abstract["params"], num_train)
  with pytest.raises(checks.ConfigError, match=message):
    _start(workdir, meta["fingerprint"], monkeypatch, changed)
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before

# ---------------------------------------------------------------------------------------------
# Through train.run.
# ---------------------------------------------------------------------------------------------


def test_incompatible_checkpoints_are_refused(tiny_idx_run, tiny_idx_dir):
  config = tiny_config(tiny_idx_dir)
  config.phases[1].rules = ("freeze:layers[:50]", "train:.*")
  with pytest.raises(checkpoint.CheckpointError, match="another config.*phases"):
    train.run(config, tiny_idx_run[0])
