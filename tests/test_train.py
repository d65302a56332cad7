"""train.run end to end on a tiny dataset: a phase that evaluates and saves its moving average
of the weights and leaves the frozen ones untouched.

Other end-to-end checks of the tiny run (conftest's tiny_idx_run) live with the module they
pin: tests/test_outputs.py, test_export.py, test_resume.py, test_tensorboard.py."""

import flax.serialization
import jax
import numpy as np

from configs import default
from helpers import saved_checkpoint, tiny_config
from tljax import dispatch, selection, train


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
  _, _, state = saved_checkpoint(tmp_path)
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
