"""Faults during a run: SIGTERM, SIGKILL mid-write, failed writes.

One workdir is stopped five times in a row through ``main.py`` in subprocesses (SIGTERM while
evaluating and while caching the next phase's prefix; Ctrl-C mid fine-tune; SIGKILL while a
checkpoint is being committed; a checkpoint write that fails in the background) and then
finished; it must end bit for bit where an uninterrupted run (conftest's fault_reference)
ends. Faults are injected by tests/fault_driver.py, which patches tljax (and, for SIGKILL
mid-commit and the failed write, Orbax's public checkpoint classes) before it runs main.py.
Subprocesses share the session's persistent XLA compilation cache (tests/conftest.py), so
only the first one compiles.

A second Ctrl-C, non-finite losses, damaged checkpoints and resuming on other data:
tests/test_reliability_resume.py (two files, so that pytest -n 2 runs them side by side). How
SIGTERM and Ctrl-C become a stop request: tests/test_preemption.py.
"""

import json

import numpy as np
import pytest

from helpers import FAULT_OVERRIDES as OVERRIDES
from helpers import (fault_launcher, flatten, read_records, resumed_from, saved_checkpoint,
                     tiny_config)
from tljax import checkpoint, exits, train

STEPS = list(range(2, 25, 2))  # Global steps that end a dispatch: 8 frozen, 16 fine-tuning.


def _steps(records, **match) -> list[int]:
  return [r["step"] for r in records
          if r["kind"] == "step" and all(r[k] == v for k, v in match.items())]


@pytest.fixture(scope="module")
def launch(tiny_idx_dir, tmp_path_factory):
  return fault_launcher(tmp_path_factory.mktemp("launch"), tiny_idx_dir)


@pytest.fixture(scope="module")
def chain(launch, fault_reference, tmp_path_factory):
  """One workdir through every fault in turn, then to the end: stage name -> Outcome."""
  workdir = tmp_path_factory.mktemp("chain")
  stages = {}
  for name, hooks in [("evaluating", "sigterm_in=dispatch.evaluate_split"),
                      ("caching", "no_weights,sigterm_in=prefix.build_prefix_caches"),
                      ("fine_tuning", "no_weights,sigint_at_step=14"),
                      ("committing", "no_weights,sigkill_at_commit=20"),
                      ("failed_write", "no_weights,fail_write=24"),
                      ("finished", "no_weights,sigterm_in=outputs.write_outputs")]:
    stages[name] = launch(workdir, hooks)
    assert "FAULT" not in stages[name].stderr, (name, stages[name].stderr[-3000:])
  return workdir, stages


def test_sigterm_during_evaluation_checkpoints_the_phase_and_exits_143(chain):
  outcome = chain[1]["evaluating"]
  assert outcome.returncode == exits.PREEMPTED == 128 + 15, outcome.stderr[-3000:]
  assert "received SIGTERM" in outcome.stderr
  assert "rerun the same command to resume" in outcome.stderr
  assert outcome.listing == ["8"]
  assert (outcome.latest, outcome.meta["phase"], outcome.meta["phase_step"]) == (8, 0, 8)
  assert [r["name"] for r in outcome.meta["results"]] == ["frozen_base"]
  assert _steps(outcome.records) == [2, 4, 6, 8]


def test_sigterm_while_caching_the_next_phase_stops_before_training(chain):
  before, outcome = chain[1]["evaluating"], chain[1]["caching"]
  assert outcome.returncode == 143, outcome.stderr[-3000:]
  assert resumed_from(outcome) == 8
  assert "caching layers[:" in outcome.stderr
  assert outcome.listing == ["8"] and outcome.latest == 8
  assert outcome.records == before.records


def test_ctrl_c_mid_fine_tune_checkpoints_the_dispatch_in_flight_and_exits_130(chain):
  outcome = chain[1]["fine_tuning"]
  assert outcome.returncode == exits.INTERRUPTED == 130, outcome.stderr[-3000:]
  assert "received SIGINT: saving a checkpoint" in outcome.stderr
  assert "Traceback" not in outcome.stderr and "KeyboardInterrupt" not in outcome.stderr
  assert resumed_from(outcome) == 8
  # Ctrl-C came as step 14 was recorded, with steps 15-16 already dispatched: they finish,
  # are recorded and saved; nothing is dispatched after it. The rerun that follows ends bit
  # for bit where the uninterrupted run ends (the last test below).
  assert outcome.listing == ["16"]
  assert (outcome.latest, outcome.meta["phase"], outcome.meta["phase_step"]) == (16, 1, 8)
  assert _steps(outcome.records)[-5:] == [8, 10, 12, 14, 16]


def test_sigkill_mid_commit_leaves_the_last_complete_checkpoint(chain):
  outcome, next_run = chain[1]["committing"], chain[1]["failed_write"]
  assert outcome.returncode == -9, outcome.stderr[-3000:]
  assert resumed_from(outcome) == 16
  # Checkpoint 20 was fully written but not committed; 16, the only one kept, survives.
  assert outcome.listing == ["16", "20.orbax-checkpoint-tmp"]
  assert outcome.latest == 16
  # Training goes on while a checkpoint is committed in the background.
  assert _steps(outcome.records)[-1] >= 20
  assert resumed_from(next_run) == 16


def test_failed_checkpoint_write_fails_the_run_and_keeps_the_previous_one(chain):
  stages = chain[1]
  outcome = stages["failed_write"]
  assert outcome.returncode == 1, outcome.stderr[-3000:]
  message = [line for line in outcome.stderr.splitlines() if "No space left on device" in line
             and "the previous checkpoint is kept" in line]
  assert message and "writing a checkpoint to" in message[0]
  # One message, not the background writer's follow-on errors.
  assert "Traceback" not in outcome.stderr and "Event loop is closed" not in outcome.stderr
  assert outcome.listing[0] == "20" and outcome.latest == 20
  assert _steps(outcome.records)[-2:] == [22, 24] and not outcome.outputs
  assert resumed_from(stages["finished"]) == 20
  assert stages["finished"].returncode == 0, stages["finished"].stderr[-3000:]
  assert stages["finished"].outputs


def test_sigterm_while_writing_the_outputs_is_reported_and_they_are_finished(chain):
  outcome = chain[1]["finished"]
  assert outcome.returncode == 0, outcome.stderr[-3000:]
  assert ("received SIGTERM while writing the outputs: finishing them first (if this process "
          "is killed before, rerunning the same command writes them again)") in outcome.stderr
  assert outcome.outputs and (chain[0] / "export" / "model.json").exists()


def test_every_fault_left_a_complete_checkpoint(chain):
  for name, outcome in chain[1].items():
    assert outcome.latest is not None and str(outcome.latest) in outcome.listing, name


def test_resumed_run_ends_bit_for_bit_where_the_uninterrupted_one_ends(fault_reference, chain):
  ref_dir, (workdir, stages) = fault_reference, chain
  ref_records, final = read_records(ref_dir), stages["finished"]
  assert final.listing == ["24"]
  ref_steps = {r["step"]: r for r in ref_records if r["kind"] == "step"}
  assert sorted(ref_steps) == STEPS
  assert set(_steps(final.records)) == set(STEPS)
  drop_timing = lambda r: {k: v for k, v in r.items() if k != "images_per_s"}
  for record in final.records:  # Each resume repeats the uninterrupted run's losses exactly.
    if record["kind"] == "step":
      assert drop_timing(record) == drop_timing(ref_steps[record["step"]])
  ref_val = {(r["phase"], r["epoch"]): r["val_loss"] for r in ref_records if r["kind"] == "epoch"}
  for record in final.records:
    if record["kind"] == "epoch":
      assert record["val_loss"] == ref_val[record["phase"], record["epoch"]]
  ref_step, _, ref_state = saved_checkpoint(ref_dir)
  step, _, state = saved_checkpoint(workdir)
  assert ref_step == step == 24
  ref_leaves = dict(flatten(ref_state))
  assert sorted(ref_leaves) == sorted(k for k, _ in flatten(state))
  for path, leaf in flatten(state):  # params, batch_stats, opt_state, step, rng, bad_steps
    np.testing.assert_array_equal(leaf, ref_leaves[path], err_msg=path)
  assert final.meta["results"][0]["name"] == "frozen_base"
  assert [r["name"] for r in final.meta["results"]] == ["frozen_base", "fine_tune"]
  ref_pred, pred = (np.load(d / "test_predictions.npz") for d in (ref_dir, workdir))
  np.testing.assert_array_equal(pred["predictions"], ref_pred["predictions"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["test_loss"] == json.loads((ref_dir / "summary.json").read_text())["test_loss"]


def test_restarts_never_rerun_a_finished_phase_or_reload_weights(chain, fault_reference):
  workdir, stages = chain
  # Only the first run trained the frozen phase; "no_weights" fails any later weight load.
  assert _steps(stages["finished"].records, phase=0) == [2, 4, 6, 8]
  epochs = [r["phase"] for r in stages["finished"].records if r["kind"] == "epoch"]
  assert epochs.count(0) == 1 and epochs[0] == 0
  assert all(resumed_from(stages[name]) for name in list(stages)[1:])
  # Resumed in the fine-tune, the runs cached its prefix themselves (the same bits, tested
  # above); the uninterrupted run used the cache its frozen phase built for it.
  fine_tune = [json.loads((d / "summary.json").read_text())["phases"][1]
               for d in (fault_reference, workdir)]
  assert [p["prefix_cached_by_previous_phase"] for p in fine_tune] == [True, False]


# ---------------------------------------------------------------------------------------------
# Another config, in process.
# ---------------------------------------------------------------------------------------------


def test_incompatible_config_is_refused_and_its_checkpoints_kept(fault_reference, tiny_idx_dir):
  workdir = fault_reference
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  config = tiny_config(tiny_idx_dir, **{**OVERRIDES, "seed": 1})
  with pytest.raises(checkpoint.CheckpointError, match=r"another config \(differs in \['seed'\]\)"
                     r"; they are left untouched"):
    train.run(config, workdir)
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
