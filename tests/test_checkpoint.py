"""tljax.checkpoint: a checkpoint whose arrays are damaged or unreadable is never restored
(digests), one that does not fit the model names the path and both shapes, and a directory
that cannot hold checkpoints fails before any work."""

import logging
import shutil
import types
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import saved_checkpoint
from tljax import checkpoint, selection


def _state(value: float):
  return {"params": {"dense": {"kernel": jnp.full((64, 32), value)}}, "step": jnp.int32(3)}


def _abstract():
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0.0))


@pytest.fixture
def two_checkpoints(tmp_path):
  """A Checkpointer holding steps 1 and 2 (states filled with 1.0 and 2.0)."""
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2):
    ckpt.save(step, _state(float(step)), {"phase": 0})
    ckpt.wait()
  yield ckpt
  ckpt.close()


def _largest_state_file(ckpt, step):
  files = (p for p in (ckpt.directory / str(step) / "state").rglob("*") if p.is_file())
  return max(files, key=lambda p: p.stat().st_size)


def test_restore_returns_the_saved_arrays_and_the_meta_carries_their_digest(two_checkpoints):
  state = two_checkpoints.restore_state(2, _abstract())
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], np.full((64, 32), 2.0))
  meta = two_checkpoints.restore_meta(2)
  assert meta["state_sha256"] == checkpoint.state_digest(_state(2.0))
  assert meta["phase"] == 0


def test_arrays_that_differ_from_their_digest_are_refused(two_checkpoints):
  # Orbax reads the arrays without complaint, but they are not the ones saved with this meta.
  directory = two_checkpoints.directory
  shutil.rmtree(directory / "2" / "state")
  shutil.copytree(directory / "1" / "state", directory / "2" / "state")
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=f"checkpoint {directory}/2 is damaged: its arrays differ from the "
                     "digest saved with them"):
    two_checkpoints.restore_state(2, _abstract())


def test_a_truncated_checkpoint_is_damaged_in_one_line(two_checkpoints):
  path = _largest_state_file(two_checkpoints, 2)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=f"checkpoint {two_checkpoints.directory}/2 cannot be read") as caught:
    two_checkpoints.restore_state(2, _abstract())
  assert "\n" not in str(caught.value)


def test_unreadable_meta_is_damaged(two_checkpoints):
  (two_checkpoints.directory / "2" / "meta" / "metadata").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointDamagedError, match="/2 cannot be read"):
    two_checkpoints.restore_meta(2)


def test_set_aside_moves_a_checkpoint_and_deletes_nothing(two_checkpoints):
  first = two_checkpoints.set_aside(2)
  assert first == two_checkpoints.directory.parent / "checkpoints.rejected" / "2"
  assert (first / "state").is_dir()
  assert two_checkpoints.all_steps() == [1] and two_checkpoints.latest_step() == 1
  two_checkpoints.save(2, _state(2.0), {})
  two_checkpoints.wait()
  assert two_checkpoints.set_aside(2).name == "2.1" and first.is_dir()


def test_digest_covers_paths_dtypes_and_values():
  digests = {checkpoint.state_digest(s) for s in (
      _state(1.0), _state(2.0), {"params": {"dense": {"kernel": jnp.full((64, 32), 1.0)}},
                                 "step": jnp.float32(3)})}
  assert len(digests) == 3
  assert checkpoint.state_digest(_state(1.0)) == checkpoint.state_digest(_state(1.0))


def test_saved_arrays_read_back_without_a_target(two_checkpoints):
  """helpers.saved_checkpoint, which tests use to compare checkpoints, reads what was saved."""
  workdir = two_checkpoints.directory.parent
  step, meta, state = saved_checkpoint(workdir)
  assert step == 2 and meta == two_checkpoints.restore_meta(2) and meta["phase"] == 0
  assert state["step"] == 3
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], np.full((64, 32), 2.0))
  assert saved_checkpoint(workdir, 1)[2]["params"]["dense"]["kernel"][0, 0] == 1.0
  assert saved_checkpoint(workdir / "elsewhere") == (None, None, None)


def test_unwritable_checkpoint_directory_fails_before_any_work(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(checkpoint.CheckpointError,
                     match=f"cannot write checkpoints to {tmp_path}/checkpoints: .*File exists"):
    checkpoint.Checkpointer(tmp_path)


def test_max_to_keep_below_one_is_refused(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep=0 must be at least 1"):
    checkpoint.Checkpointer(tmp_path, max_to_keep=0)


def test_restore_into_another_model_names_the_path_and_both_shapes(tmp_path):
  state = {"params": {"predictions": {"kernel": jnp.zeros((8, 10))}}, "step": jnp.zeros(())}
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(3, state, {})
  ckpt.wait()
  other = {"params": {"predictions": {"kernel": jax.ShapeDtypeStruct((8, 5), jnp.float32)}},
           "step": jax.ShapeDtypeStruct((), jnp.float32)}
  with pytest.raises(checkpoint.CheckpointError, match=r"params/predictions/kernel has shape "
                     r"\(8, 10\) there but \(8, 5\) here"):
    ckpt.restore_state(3, other)
  ckpt.close()


class _PhaseState(typing.NamedTuple):
  """What selection.selected_state reads of a phase's state."""
  step: Any
  params: Any
  batch_stats: Any

  def replace(self, **changes):
    return self._replace(**changes)


def test_a_damaged_best_checkpoint_is_set_aside_and_the_last_weights_used(tmp_path, caplog):
  """A phase that selects its best epoch goes on with its last epoch's weights, saying so,
  where the best epoch's checkpoint is damaged."""
  phase = types.SimpleNamespace(name="head", index=0, total_steps=16, config=types.SimpleNamespace(
      select="best", select_metric="val_accuracy", ema_decay=0.0, early_stopping_patience=0))
  tracker = selection.Tracker("val_accuracy", best_value=0.9, best_epoch=1, best_step=8)
  meta = {"selection": tracker.to_meta(0)}
  best = tmp_path / checkpoint.BEST
  for step, value in ((8, 1.0), (12, 3.0)):
    checkpoint.save_best(tmp_path, step, {"params": _state(value)["params"], "batch_stats": {}},
                         meta["selection"])
  shutil.rmtree(best / "8" / "state")  # Epoch 1's checkpoint now holds other arrays.
  shutil.copytree(best / "12" / "state", best / "8" / "state")
  last = _PhaseState(jnp.int32(16), _state(2.0)["params"], {})
  with caplog.at_level(logging.WARNING):
    state, weights_from = selection.selected_state(
        meta, types.SimpleNamespace(directory=tmp_path / "checkpoints"), phase, last,
        {"epoch": 2, "step": 16, "val_accuracy": 0.5}, stopped=False)
  np.testing.assert_array_equal(state.params["dense"]["kernel"], np.full((64, 32), 2.0))
  assert (weights_from["epoch"], weights_from["step"], weights_from["value"]) == (2, 16, 0.5)
  rejected = tmp_path / f"{checkpoint.BEST}.rejected" / "8"
  assert [r.getMessage() for r in caplog.records if r.name == "root"] == [
      f"checkpoint {tmp_path}/{checkpoint.BEST}/8 is damaged: its arrays differ from the digest "
      f"saved with them; moved it to {rejected}; phase head continues with its last epoch's "
      "weights instead"]
  assert rejected.is_dir() and not (best / "8").exists()
