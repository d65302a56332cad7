"""Plain helpers shared by test files: configs, writers of small inputs, readers of a run's
outputs and checkpoints, and the launcher of main.py in subprocesses. Fixtures live in
conftest.py; a test file imports these with ``import helpers`` / ``from helpers import ...``
(pytest puts tests/ on the path; subprocess configs insert it themselves)."""

import dataclasses
import gzip
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
FAULT_DRIVER = TESTS / "fault_driver.py"



def unavailable(skip_reason: str, ci_failure: str):
  """Skips the test where something it needs is missing, with ``skip_reason``; with ``CI``
  set, fails it with ``ci_failure`` instead: CI provides everything, so nothing skips there."""
  if os.environ.get("CI"):
    pytest.fail(ci_failure)
  pytest.skip(skip_reason)

# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------


def override(config, **overrides):
  """Sets dotted keys of ``config`` (``"phases.1.epochs"``: a digit indexes a list)."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[int(p)] if p.isdigit() else target[p]
    target[leaf] = value
  return config


def tiny_config(data_dir, **overrides):
  """Two short phases of an alpha 0.35 MobileNetV2 from random weights on an IDX folder
  (conftest's tiny_idx_dir: 128 training images, 8 steps an epoch at batch 16)."""
  from configs import default
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
  config.export.formats = ("jax",)  # The other formats: tests/test_deploy.py.
  return override(config, **overrides)


def folder_config(root, **data_overrides):
  """The default config on a folder of photos at input size 32, its cache beside it."""
  from configs import default
  config = default.get_config()
  config.data.dir = str(root)
  config.data.cache_dir = str(pathlib.Path(root).parent / f"{pathlib.Path(root).name}_cache")
  config.model.input_size = 32
  config.export.formats = ("jax",)  # The other formats: tests/test_deploy.py.
  config.data.update(data_overrides)
  return config


def load_folder(config, splits_dir=None, workdir=None):
  """``folder.load_folder`` with what it takes of ``config``, as ``data.load`` calls it."""
  from tljax.data import folder
  size = folder.stored_size(config.data.image_size, config.model.input_size)
  return folder.load_folder(config.data, stored_size=size, seed=config.seed,
                            splits_dir=splits_dir, progress=False, workdir=workdir)


def tiny_folder_config(root, **data_overrides):
  """Two short phases on a folder of small images: a cached head phase, then a fine-tune with
  random crops and flips (conftest's tiny_folder_run)."""
  config = folder_config(root, validation_split=0.25, test_split=0.25, random_crop=True,
                         flip=True, eval_crop=0.875, scale="symmetric", **data_overrides)
  config.model.alpha = 0.35
  config.model.weights = "none"
  config.batch_size = 6
  config.eval_batch_size = 12
  config.steps_per_dispatch = 1  # So that a run can stop mid-epoch (3 steps an epoch).
  config.phases[0].epochs = 1
  config.phases[0].use_augmentation = False
  config.phases[1].epochs = 1
  config.phases[1].learning_rate = 1e-3
  return config


def _model():
  from tljax.models.mobilenet_v2 import MobileNetV2
  return MobileNetV2(alpha=0.35, include_top=True, num_classes=10)


def calibrated(model, variables, x):
  """``variables`` with every BatchNorm's moving statistics those of the batch ``x``, so that
  activations in inference mode neither vanish nor saturate (traceable: jit it or not)."""
  import jax.numpy as jnp
  bn = [layer for layer in model.layers if layer.kind == "bn"]
  before_bn, _ = model.apply(variables, x, train_bn=frozenset(l.name for l in bn),
                             capture=[l.inputs[0] for l in bn], mutable=["batch_stats"])
  stats = {l.name: {"mean": jnp.mean(before_bn[l.inputs[0]], (0, 1, 2)),
                    "var": jnp.var(before_bn[l.inputs[0]], (0, 1, 2))} for l in bn}
  return {"params": variables["params"], "batch_stats": stats}


# The alpha 0.35 MobileNetV2 with a 10-class head, and the layers freeze rules index.
MODEL = _model()
BASE = MODEL.base_layers

# ---------------------------------------------------------------------------------------------
# Small inputs.
# ---------------------------------------------------------------------------------------------


def write_idx(path, array, magic=None) -> pathlib.Path:
  """Writes ``array`` (uint8, 1-D labels or 3-D images) as an IDX file, gzipped if ``path``
  ends in .gz; ``magic`` replaces the right magic number."""
  array = np.asarray(array)
  magic = magic if magic is not None else 0x800 + array.ndim
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  payload = header + np.ascontiguousarray(array.astype(np.uint8)).tobytes()
  with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
    f.write(payload)
  return pathlib.Path(path)


def write_idx_folder(folder: pathlib.Path, n_train=5, n_test=3, train_labels=None
                     ) -> pathlib.Path:
  """The four IDX files of a 3-class dataset of blank 4x4 images (the test images not
  gzipped: plain files work too)."""
  folder.mkdir(exist_ok=True)
  labels = train_labels if train_labels is not None else np.arange(n_train) % 3
  write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((n_train, 4, 4)))
  write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
  write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((n_test, 4, 4)))
  write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 3)
  return folder


def write_image(path: pathlib.Path, label: int = 0, size=(12, 10)) -> pathlib.Path:
  """A small image whose colour encodes ``label`` (and whose format is the suffix's)."""
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.zeros((*size, 3), np.uint8)
  pixels[..., label % 3] = 200
  pixels[: size[0] // 2, :, (label + 1) % 3] = 100 + 40 * (label // 3)
  Image.fromarray(pixels).save(path)
  return path


def make_folder(root: pathlib.Path, counts: dict[str, int], prefix: str = "",
                ext: str = "png") -> pathlib.Path:
  """``root/prefix/<class>/<i>.<ext>``: ``counts[class]`` images of each class, the classes
  labelled in sorted order."""
  for label, (name, n) in enumerate(sorted(counts.items())):
    for i in range(n):
      write_image(root / prefix / name / f"{i:03d}.{ext}", label)
  return root


def train_paths(root) -> list[str]:
  """The training files the scan of the folder ``root`` finds."""
  from tljax.data import folder
  return [path for path, _ in folder.scan(root).files["train"]]


def counting_decodes(monkeypatch) -> list[str]:
  """The paths decoded from now on (in this process: fewer than 64 files at a time)."""
  from tljax.data import images
  decoded, load_stored = [], images.try_load_stored
  monkeypatch.setattr(images, "try_load_stored",
                      lambda path, size: decoded.append(path) or load_stored(path, size))
  return decoded

# ---------------------------------------------------------------------------------------------
# What a run wrote.
# ---------------------------------------------------------------------------------------------


def logged_error(caplog) -> logging.LogRecord:
  """The one error tljax logged (``main`` and ``predict`` log to the root logger).

  Libraries log under their own names (Orbax as ``absl``, JAX as ``jax._src...``) and may do
  so from background threads at any time; those are not the run's message.
  """
  errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
  ours = [r for r in errors if r.name == "root"]
  assert len(ours) == 1, [f"{r.name}: {r.getMessage()}" for r in errors]
  return ours[0]


def read_records(workdir: pathlib.Path) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl`` ([] where there is none)."""
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_variables(workdir: pathlib.Path):
  """``<workdir>/trained_variables.msgpack``, as NumPy arrays."""
  import flax.serialization
  return flax.serialization.msgpack_restore((workdir / "trained_variables.msgpack").read_bytes())


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


def saved_checkpoint(workdir: pathlib.Path, step: int | None = None):
  """``(step, meta, state)`` of checkpoint ``step`` (default: the latest, as a restart sees
  it) in ``<workdir>/checkpoints``, the state's arrays as saved, read with Orbax's public API
  and no target: for comparing checkpoints, not resuming. ``(None, None, None)`` where there
  is none."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(workdir / "checkpoints", options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None, None, None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return step, restored["meta"], restored["state"]


def flatten(tree, prefix=""):
  """Yields ``("/a/0/b", np.ndarray)`` for every leaf of nested dicts, lists and tuples."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from flatten(value, f"{prefix}/{key}")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      yield from flatten(value, f"{prefix}/{i}")
  else:
    yield prefix, np.asarray(tree)


def assert_same_state(expected, actual):
  """Both trees have the same paths and bit-identical arrays."""
  expected = dict(flatten(expected))
  assert sorted(expected) == sorted(k for k, _ in flatten(actual))
  for path, leaf in flatten(actual):
    np.testing.assert_array_equal(leaf, expected[path], err_msg=path)


# Absolute, on every parameter and BatchNorm statistic of a run in several processes against
# one process (SGD and BatchNorm in inference mode: float32 sums in another order).
MULTIPROCESS_TOLERANCE = 1e-5


def worst_difference(a, b) -> float:
  """The largest absolute difference between the leaves of two trees of one structure."""
  import jax
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b)))

# ---------------------------------------------------------------------------------------------
# main.py in subprocesses, under tests/fault_driver.py.
# ---------------------------------------------------------------------------------------------

# A config file for main.py's --config: tiny_config with ``overrides``.
TINY_CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config

def get_config():
  return tiny_config({data_dir!r}, **{overrides!r})
"""


def write_tiny_config(path: pathlib.Path, data_dir, overrides) -> pathlib.Path:
  path.write_text(TINY_CONFIG_FILE.format(tests=str(TESTS), data_dir=str(data_dir),
                                          overrides=overrides))
  return path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def with_devices(env: dict[str, str], count: int) -> dict[str, str]:
  """``env`` for a JAX process with ``count`` CPU devices, keeping the XLA flags it has."""
  flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}


def launcher(directory: pathlib.Path, default_config: pathlib.Path):
  """``launch(workdir, processes, devices_each, hooks, config) -> [(returncode, stderr)]``:
  main.py under tests/fault_driver.py, in one or more processes on this machine (a
  coordinator on 127.0.0.1), with ``default_config`` unless a config file is given. Their
  logs go to files under ``directory``."""

  def launch(workdir, processes, devices_each, hooks="", config=default_config):
    env = with_devices(dict(os.environ), devices_each)
    flags = [f"--config={config}", f"--workdir={workdir}"]
    if processes > 1:
      flags += [f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
                f"--config.distributed.num_processes={processes}"]
    launch_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{workdir.name}_", dir=directory))
    logs = [launch_dir / f"process_{i}.log" for i in range(processes)]
    children = [subprocess.Popen(
        [sys.executable, str(FAULT_DRIVER), hooks, *flags,
         *([f"--config.distributed.process_id={i}"] if processes > 1 else [])],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        for i, log in enumerate(logs)]
    try:
      return [(child.wait(timeout=600), log.read_text()) for child, log in zip(children, logs)]
    finally:
      for child in children:
        child.kill()

  return launch


def run_driver(hooks: str, config: pathlib.Path,
               workdir: pathlib.Path) -> subprocess.CompletedProcess:
  """main.py under tests/fault_driver.py in one process; its output captured."""
  return subprocess.run(
      [sys.executable, str(FAULT_DRIVER), hooks, f"--config={config}", f"--workdir={workdir}"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600)


# helpers.tiny_config for the fault tests (test_reliability*.py): two-step dispatches, one
# checkpoint kept, and a two-epoch fine-tune of the last convolution (cheap to compile). Global
# steps 2, 4, ..., 24 end a dispatch: 8 frozen, 16 fine-tuning.
FAULT_OVERRIDES = {"steps_per_dispatch": 2, "max_to_keep": 1, "phases.0.epochs": 1,
                   "phases.1.epochs": 2, "phases.1.rules": ("freeze:layers[:151]", "train:.*")}


@dataclasses.dataclass
class Outcome:
  """A finished main.py subprocess and what its workdir held afterwards."""
  returncode: int
  stderr: str
  listing: list[str]          # <workdir>/checkpoints
  latest: int | None          # As a restart sees it.
  meta: dict | None
  records: list[dict]         # metrics.jsonl
  outputs: bool               # summary.json was written.


def fault_launcher(directory: pathlib.Path, data_dir):
  """``launch(workdir, hooks="", **overrides) -> Outcome``: main.py under
  tests/fault_driver.py on ``FAULT_OVERRIDES`` (and ``overrides``) of tiny_config, with the
  session's compilation cache; config files go to ``directory``."""

  def launch(workdir: pathlib.Path, hooks: str = "", **overrides) -> Outcome:
    config = write_tiny_config(directory / f"{workdir.name}_config.py", data_dir,
                               {**FAULT_OVERRIDES, **overrides})
    done = run_driver(hooks, config, workdir)
    listing = sorted(os.listdir(workdir / "checkpoints"))
    latest, meta, _ = saved_checkpoint(workdir)
    return Outcome(done.returncode, done.stderr, listing, latest, meta, read_records(workdir),
                   (workdir / "summary.json").exists())

  return launch


def resumed_from(outcome: Outcome) -> int:
  """The checkpoint a launch logged it resumed from."""
  return int(outcome.stderr.split("resuming from checkpoint ")[1].split(":")[0])
