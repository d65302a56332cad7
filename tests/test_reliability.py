"""Faults during a run: SIGTERM, Ctrl-C, SIGKILL mid-write, failed writes, non-finite losses,
damaged checkpoints, resuming on other data.

One workdir is stopped five times in a row through ``main.py`` in subprocesses (SIGTERM while
evaluating, while caching the next phase's prefix and mid fine-tune; SIGKILL while a
checkpoint is being committed; a checkpoint write that fails in the background) and then
finished; it must end bit for bit where an uninterrupted run ends. Faults are injected by
a driver that patches tljax (and, for SIGKILL mid-commit and the failed write, Orbax
internals of the pinned version) before it runs main.py. Subprocesses share the session's
persistent XLA compilation cache (tests/conftest.py), so only the first one compiles.
"""

import dataclasses
import errno
import gzip
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import logged_error
from tljax import checkpoint, dispatch, exits, preemption, train

REPO = pathlib.Path(__file__).resolve().parents[1]

# tests/test_train.py's tiny config, with two-step dispatches, one checkpoint kept, and a
# two-epoch fine-tune of the last convolution (cheap to compile).
OVERRIDES = {"steps_per_dispatch": 2, "max_to_keep": 1, "phases.0.epochs": 1,
             "phases.1.epochs": 2, "phases.1.rules": ("freeze:layers[:151]", "train:.*")}
STEPS = list(range(2, 25, 2))  # Global steps that end a dispatch: 8 frozen, 16 fine-tuning.

CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_train import tiny_config

def get_config():
  return tiny_config({data_dir!r}, **{overrides!r})
"""

DRIVER = textwrap.dedent('''
  """python driver.py HOOK[,HOOK...] MAIN_FLAGS...: main.py with faults injected."""
  import errno, importlib, os, runpy, signal, sys
  sys.path.insert(0, os.getcwd())
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity
  from tljax import reporting, steps, train
  from tljax.models import weights

  def signal_at_step(step, signum):  # Right after the step record of global step ``step``.
    write = reporting.MetricsWriter.write
    def patched(self, record):
      write(self, record)
      if record["kind"] == "step" and record["step"] == int(step):
        os.kill(os.getpid(), signum)
    reporting.MetricsWriter.write = patched

  def sigterm_at_step(step):
    signal_at_step(step, signal.SIGTERM)

  def sigkill_at_step(step):
    signal_at_step(step, signal.SIGKILL)

  def sigint_at_step(step):
    signal_at_step(step, signal.SIGINT)

  def sigterm_in(where):  # While tljax.<module>.<function> runs.
    module_name, name = where.split(".")
    module = importlib.import_module(f"tljax.{module_name}")
    original = getattr(module, name)
    def patched(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGTERM)
      return original(*args, **kwargs)
    setattr(module, name, patched)

  def sigkill_at_commit(step):  # Checkpoint ``step`` written, not yet renamed into place.
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def patched(self):
      if self.get_final().name == step:
        os.kill(os.getpid(), signal.SIGKILL)
      await finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = patched

  def fail_write(step):  # The background write of checkpoint ``step`` fails.
    class NoSpace:
      def result(self, timeout=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    async_save = ocp.StandardCheckpointHandler.async_save
    async def patched(self, directory, *args, **kwargs):
      futures = list(await async_save(self, directory, *args, **kwargs) or [])
      if f"/{step}.orbax-checkpoint-tmp/" in str(directory):
        futures.append(NoSpace())
      return futures
    ocp.StandardCheckpointHandler.async_save = patched

  def no_weights():
    def refuse(*args, **kwargs):
      print("FAULT: the weights were loaded again", file=sys.stderr)
      raise SystemExit(97)
    weights.load_pretrained = refuse

  def nan_loss():
    cross_entropy = steps.cross_entropy
    steps.cross_entropy = lambda *args: cross_entropy(*args) * jnp.nan

  def count_rows_read():  # Rows of a decoded cache this process reads, printed at exit.
    import atexit
    import numpy as np
    from tljax.data import dataset
    getitem, read = dataset.RowView.__getitem__, [0]
    def counted(self, index):
      read[0] += 0 if isinstance(index, slice) else np.size(self.rows[index])
      return getitem(self, index)
    dataset.RowView.__getitem__ = counted
    atexit.register(lambda: print(f"ROWS READ: {read[0]}", file=sys.stderr))

  for spec in filter(None, sys.argv[1].split(",")):
    name, _, arg = spec.partition("=")
    globals()[name](*([arg] if arg else []))
  sys.argv = ["main.py", *sys.argv[2:]]
  runpy.run_path("main.py", run_name="__main__")
''')


@dataclasses.dataclass
class Outcome:
  """A finished subprocess and what its workdir held afterwards."""
  returncode: int
  stderr: str
  listing: list[str]          # <workdir>/checkpoints
  latest: int | None          # As a restart sees it.
  meta: dict | None
  records: list[dict]         # metrics.jsonl
  outputs: bool               # summary.json was written.


def _records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _steps(records, **match) -> list[int]:
  return [r["step"] for r in records
          if r["kind"] == "step" and all(r[k] == v for k, v in match.items())]


def _checkpoint(workdir: pathlib.Path):
  """``(latest step, its meta, its raw state)`` as a fresh process would restore them."""
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    step = ckpt.latest_step()
    if step is None:
      return None, None, None
    return step, ckpt.restore_meta(step), ckpt.restore_arrays(step)["state"]
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def launch(tiny_idx_dir, tmp_path_factory):
  """``launch(workdir, hooks="", **overrides) -> Outcome``: main.py under the driver."""
  root = tmp_path_factory.mktemp("launch")
  (root / "driver.py").write_text(DRIVER)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # With the session's compilation cache.

  def run(workdir: pathlib.Path, hooks: str = "", **overrides) -> Outcome:
    config = root / f"{workdir.name}_config.py"
    config.write_text(CONFIG_FILE.format(tests=str(REPO / "tests"), data_dir=str(tiny_idx_dir),
                                         overrides={**OVERRIDES, **overrides}))
    done = subprocess.run(
        [sys.executable, str(root / "driver.py"), hooks, f"--config={config}",
         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)
    listing = sorted(os.listdir(workdir / "checkpoints"))
    latest, meta, _ = _checkpoint(workdir)
    return Outcome(done.returncode, done.stderr, listing, latest, meta, _records(workdir),
                   (workdir / "summary.json").exists())

  return run


@pytest.fixture(scope="module")
def reference(launch, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  outcome = launch(workdir)
  assert outcome.returncode == 0, outcome.stderr[-3000:]
  return workdir, outcome


@pytest.fixture(scope="module")
def chain(launch, reference, tmp_path_factory):
  """One workdir through every fault in turn, then to the end: stage name -> Outcome."""
  workdir = tmp_path_factory.mktemp("chain")
  stages = {}
  for name, hooks in [("evaluating", "sigterm_in=dispatch.evaluate_split"),
                      ("caching", "no_weights,sigterm_in=prefix.build_prefix_caches"),
                      ("fine_tuning", "no_weights,sigterm_at_step=14"),
                      ("committing", "no_weights,sigkill_at_commit=20"),
                      ("failed_write", "no_weights,fail_write=24"),
                      ("finished", "no_weights")]:
    stages[name] = launch(workdir, hooks)
    assert "FAULT" not in stages[name].stderr, (name, stages[name].stderr[-3000:])
  return workdir, stages


def _resumed_from(outcome: Outcome) -> int:
  return int(outcome.stderr.split("resuming from checkpoint ")[1].split(":")[0])


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
  assert _resumed_from(outcome) == 8
  assert "caching layers[:" in outcome.stderr
  assert outcome.listing == ["8"] and outcome.latest == 8
  assert outcome.records == before.records


def test_sigterm_mid_fine_tune_checkpoints_the_dispatch_in_flight(chain):
  outcome = chain[1]["fine_tuning"]
  assert outcome.returncode == 143, outcome.stderr[-3000:]
  assert _resumed_from(outcome) == 8
  # The signal came as step 14 was recorded, with steps 15-16 already dispatched: they
  # finish, are recorded and saved; nothing is dispatched after the signal.
  assert outcome.listing == ["16"]
  assert (outcome.latest, outcome.meta["phase"], outcome.meta["phase_step"]) == (16, 1, 8)
  assert _steps(outcome.records)[-5:] == [8, 10, 12, 14, 16]


def test_sigkill_mid_commit_leaves_the_last_complete_checkpoint(chain):
  outcome, next_run = chain[1]["committing"], chain[1]["failed_write"]
  assert outcome.returncode == -9, outcome.stderr[-3000:]
  assert _resumed_from(outcome) == 16
  # Checkpoint 20 was fully written but not committed; 16, the only one kept, survives.
  assert outcome.listing == ["16", "20.orbax-checkpoint-tmp"]
  assert outcome.latest == 16
  # Training goes on while a checkpoint is committed in the background.
  assert _steps(outcome.records)[-1] >= 20
  assert _resumed_from(next_run) == 16


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
  assert _resumed_from(stages["finished"]) == 20
  assert stages["finished"].returncode == 0, stages["finished"].stderr[-3000:]
  assert stages["finished"].outputs


def test_every_fault_left_a_complete_checkpoint(chain):
  for name, outcome in chain[1].items():
    assert outcome.latest is not None and str(outcome.latest) in outcome.listing, name


def test_resumed_run_ends_bit_for_bit_where_the_uninterrupted_one_ends(reference, chain):
  (ref_dir, ref), (workdir, stages) = reference, chain
  final = stages["finished"]
  assert ref.listing == final.listing == ["24"]
  ref_steps = {r["step"]: r for r in ref.records if r["kind"] == "step"}
  assert sorted(ref_steps) == STEPS
  assert set(_steps(final.records)) == set(STEPS)
  drop_timing = lambda r: {k: v for k, v in r.items() if k != "images_per_s"}
  for record in final.records:  # Each resume repeats the uninterrupted run's losses exactly.
    if record["kind"] == "step":
      assert drop_timing(record) == drop_timing(ref_steps[record["step"]])
  ref_val = {(r["phase"], r["epoch"]): r["val_loss"] for r in ref.records if r["kind"] == "epoch"}
  for record in final.records:
    if record["kind"] == "epoch":
      assert record["val_loss"] == ref_val[record["phase"], record["epoch"]]
  _, _, ref_state = _checkpoint(ref_dir)
  _, _, state = _checkpoint(workdir)
  ref_leaves = dict(_flatten(ref_state))
  assert sorted(ref_leaves) == sorted(k for k, _ in _flatten(state))
  for path, leaf in _flatten(state):  # params, batch_stats, opt_state, step, rng, bad_steps
    np.testing.assert_array_equal(leaf, ref_leaves[path], err_msg=path)
  assert final.meta["results"][0]["name"] == "frozen_base"
  assert [r["name"] for r in final.meta["results"]] == ["frozen_base", "fine_tune"]
  ref_pred, pred = (np.load(d / "test_predictions.npz") for d in (ref_dir, workdir))
  np.testing.assert_array_equal(pred["predictions"], ref_pred["predictions"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["test_loss"] == json.loads((ref_dir / "summary.json").read_text())["test_loss"]


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flatten(value, f"{prefix}/{key}")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      yield from _flatten(value, f"{prefix}/{i}")
  else:
    yield prefix, np.asarray(tree)


def test_restarts_never_rerun_a_finished_phase_or_reload_weights(chain):
  stages = chain[1]
  # Only the first run trained the frozen phase; "no_weights" fails any later weight load.
  assert _steps(stages["finished"].records, phase=0) == [2, 4, 6, 8]
  epochs = [r["phase"] for r in stages["finished"].records if r["kind"] == "epoch"]
  assert epochs.count(0) == 1 and epochs[0] == 0
  assert all(_resumed_from(stages[name]) for name in list(stages)[1:])


def test_non_finite_losses_are_skipped_then_stop_the_run(launch, reference, tmp_path):
  outcome = launch(tmp_path / "nan", "nan_loss", max_bad_steps=3)
  assert outcome.returncode == 1, outcome.stderr[-3000:]
  assert ("phase frozen_base: steps 1..4 of the phase all had a non-finite loss or gradient "
          "(max_bad_steps=3); they were skipped.") in outcome.stderr
  assert "Traceback" not in outcome.stderr
  steps = [r for r in outcome.records if r["kind"] == "step"]
  assert [(r["step"], r["skipped_steps"]) for r in steps] == [(2, 2), (4, 2)]
  assert all(r["loss"] is None for r in steps)  # Strict JSON: null, not NaN.
  assert "NaN" not in (tmp_path / "nan" / "metrics.jsonl").read_text()
  assert outcome.latest is None and not outcome.outputs


def test_sigint_checkpoints_exits_130_and_the_rerun_ends_bit_for_bit(launch, reference,
                                                                     tmp_path):
  workdir = tmp_path / "ctrl_c"
  outcome = launch(workdir, "sigint_at_step=14")
  assert outcome.returncode == 130, outcome.stderr[-3000:]
  assert "received SIGINT: saving a checkpoint" in outcome.stderr
  assert "Traceback" not in outcome.stderr and "KeyboardInterrupt" not in outcome.stderr
  # Steps 15-16 were in flight when step 14 was recorded: they finish and are saved.
  assert outcome.listing == ["16"] and outcome.meta["phase_step"] == 8
  finished = launch(workdir, "no_weights")
  assert finished.returncode == 0 and _resumed_from(finished) == 16, finished.stderr[-3000:]
  _assert_same_state(_checkpoint(reference[0])[2], _checkpoint(workdir)[2])


def _assert_same_state(expected, actual):
  expected = dict(_flatten(expected))
  assert sorted(expected) == sorted(k for k, _ in _flatten(actual))
  for path, leaf in _flatten(actual):
    np.testing.assert_array_equal(leaf, expected[path], err_msg=path)


def test_a_second_sigint_stops_at_once():
  stop = preemption.StopSignal()
  with stop.installed():
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert preemption.Preempted("stopped", signal.SIGINT).exit_code == 130


def test_stop_signal_records_sigterm_and_restores_the_handler():
  stop, before = preemption.StopSignal(), signal.getsignal(signal.SIGTERM)
  with stop.installed():
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
  assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# Checkpoint directory faults, in process.
# ---------------------------------------------------------------------------------------------


def test_unwritable_checkpoint_directory_fails_before_any_work(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(checkpoint.CheckpointError,
                     match=f"cannot write checkpoints to {tmp_path}/checkpoints: .*File exists"):
    checkpoint.Checkpointer(tmp_path)


def test_max_to_keep_below_one_is_refused(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep=0 must be at least 1"):
    checkpoint.Checkpointer(tmp_path, max_to_keep=0)


def test_restore_into_another_model_names_the_path_and_both_shapes(tmp_path):
  import jax
  import jax.numpy as jnp
  state = {"params": {"predictions": {"kernel": jnp.zeros((8, 10))}}, "step": jnp.zeros(())}
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(3, state, {})
  ckpt.wait()
  other = {"params": {"predictions": {"kernel": jax.ShapeDtypeStruct((8, 5), jnp.float32)}},
           "step": jax.ShapeDtypeStruct((), jnp.float32)}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"params/predictions/kernel has shape \(8, 10\) there but \(8, 5\) here"):
    ckpt.restore_state(3, other)
  ckpt.close()


def test_incompatible_config_is_refused_and_its_checkpoints_kept(reference, tiny_idx_dir):
  from test_train import tiny_config
  workdir, _ = reference
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  config = tiny_config(tiny_idx_dir, **{**OVERRIDES, "seed": 1})
  with pytest.raises(checkpoint.CheckpointError, match=r"another config \(differs in \['seed'\]\)"
                     r"; they are left untouched"):
    train.run(config, workdir)
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


# ---------------------------------------------------------------------------------------------
# Resuming from the wrong data or a damaged checkpoint, in process.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_idx_dir, tmp_path_factory):
  """A finished run keeping two checkpoints (20 and 24), and its final state."""
  from test_train import tiny_config
  workdir = tmp_path_factory.mktemp("finished")
  train.run(tiny_config(tiny_idx_dir, **{**OVERRIDES, "max_to_keep": 2}), workdir)
  return workdir, _checkpoint(workdir)[2]


def _rerun(workdir, data_dir, caplog, **overrides) -> int:
  import main
  from test_train import tiny_config
  caplog.clear()
  with caplog.at_level(logging.INFO):
    return main.run(tiny_config(data_dir, **{**OVERRIDES, "max_to_keep": 2, **overrides}),
                    str(workdir))


def _copy_without_outputs(finished, tmp_path) -> pathlib.Path:
  workdir = shutil.copytree(finished[0], tmp_path / "run")
  (workdir / "summary.json").unlink()
  return workdir


def _largest_state_file(workdir, step) -> pathlib.Path:
  files = (p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file())
  return max(files, key=lambda p: p.stat().st_size)


def _bit_rot(path):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(4096)
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_resuming_on_other_data_is_refused(finished, tiny_idx_dir, tmp_path, caplog):
  other = shutil.copytree(tiny_idx_dir, tmp_path / "other")
  images = other / "train-images-idx3-ubyte.gz"
  data = bytearray(gzip.decompress(images.read_bytes()))
  data[-1] ^= 1  # One pixel of one image.
  images.write_bytes(gzip.compress(bytes(data)))
  before = {p: p.stat().st_mtime_ns for p in finished[0].rglob("*")}
  assert _rerun(finished[0], other, caplog) == 2
  assert "holds checkpoints of another config (differs in ['data.identity'])" in caplog.text
  assert {p: p.stat().st_mtime_ns for p in finished[0].rglob("*")} == before


@pytest.mark.parametrize("damage", [_bit_rot, _truncate], ids=["bit_rot", "truncated"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    damage, finished, tiny_idx_dir, tmp_path, caplog):
  workdir = _copy_without_outputs(finished, tmp_path)
  damage(_largest_state_file(workdir, 24))
  assert _rerun(workdir, tiny_idx_dir, caplog) == 0, caplog.text
  [report] = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
  assert report.startswith(f"checkpoint {workdir}/checkpoints/24 ")
  assert f"moved it to {workdir}/checkpoints.rejected/24" in report and "\n" not in report
  assert "resuming from checkpoint 20" in caplog.text
  assert (workdir / "checkpoints.rejected" / "24" / "state").is_dir()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "24"]
  _assert_same_state(finished[1], _checkpoint(workdir)[2])
  assert (json.loads((workdir / "summary.json").read_text())["test_loss"]
          == json.loads((finished[0] / "summary.json").read_text())["test_loss"])


def test_a_truncated_checkpoint_is_one_line_on_the_command_line(finished, launch, tmp_path):
  """Orbax's abandoned reads (hundreds of tracebacks when collected) stay out of the log."""
  workdir = _copy_without_outputs(finished, tmp_path)
  _truncate(_largest_state_file(workdir, 24))
  outcome = launch(workdir, max_to_keep=2)
  assert outcome.returncode == 0 and outcome.outputs, outcome.stderr[-3000:]
  assert outcome.stderr.count(f"moved it to {workdir}/checkpoints.rejected/24") == 1
  for noise in ("Traceback", "Exception ignored", "Event loop is closed"):
    assert noise not in outcome.stderr, outcome.stderr[-3000:]


def test_no_restorable_checkpoint_fails_naming_the_directories_tried(
    finished, tiny_idx_dir, tmp_path, caplog):
  workdir = _copy_without_outputs(finished, tmp_path)
  for step in (20, 24):
    _truncate(_largest_state_file(workdir, step))
  assert _rerun(workdir, tiny_idx_dir, caplog) == 1
  error = logged_error(caplog).getMessage()
  assert error == (
      f"no checkpoint in {workdir}/checkpoints could be restored; tried "
      f"{workdir}/checkpoints/24 (now {workdir}/checkpoints.rejected/24), "
      f"{workdir}/checkpoints/20 (now {workdir}/checkpoints.rejected/20). Rerunning the same "
      "command starts the run from the beginning.")
  assert sorted(os.listdir(workdir / "checkpoints.rejected")) == ["20", "24"]


def test_a_full_disk_while_writing_the_outputs_fails_and_keeps_the_checkpoints(
    finished, tiny_idx_dir, tmp_path, caplog, monkeypatch):
  workdir = _copy_without_outputs(finished, tmp_path)

  def disk_full(path, mode="w"):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  monkeypatch.setattr(train.reporting, "atomic_open", disk_full)
  assert _rerun(workdir, tiny_idx_dir, caplog) == 1
  error = logged_error(caplog).getMessage()
  assert error.startswith(f"writing the outputs to {workdir}/trained_variables.msgpack failed: "
                          "No space left on device. The last checkpoint is kept")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "24"]
  assert not (workdir / "summary.json").exists()


def test_a_non_finite_test_loss_fails_the_run(finished, tiny_idx_dir, tmp_path, caplog,
                                               monkeypatch):
  workdir = _copy_without_outputs(finished, tmp_path)
  evaluate_split = dispatch.evaluate_split
  monkeypatch.setattr(dispatch, "evaluate_split", lambda *args: (
      float("nan"), *evaluate_split(*args)[1:]))
  assert _rerun(workdir, tiny_idx_dir, caplog) == 1
  assert "the test loss is nan: the trained model computes non-finite values" in caplog.text
  assert not (workdir / "summary.json").exists()
