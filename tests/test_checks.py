"""tljax.checks: each bad setting is one ConfigError naming it and the fix, and the fingerprint
a checkpoint must match changes with what shapes the state and with the data itself."""

import types

import numpy as np
import pytest

from configs import default
from helpers import override, tiny_config, write_idx, write_idx_folder
from tljax import checks, sharding
from tljax.data import idx

ONE_DEVICE = sharding.data_mesh()


@pytest.mark.parametrize("overrides, message", [
    ({"max_to_keep": 0}, "max_to_keep=0 must be at least 1: a restart resumes from the latest "
     "checkpoint."),
    ({"steps_per_dispatch": 0}, "steps_per_dispatch=0 must be at least 1."),
    ({"checkpoint_every_steps": -5}, "checkpoint_every_steps=-5 must be >= 0 (0 = only at "
     "epoch and phase ends)."),
    ({"phases.1.warmup_epochs": 6.0}, "phases[1] ('fine_tune'): warmup_epochs=6.0 must be in "
     "[0, epochs=5]: the warmup is part of the phase. Lower warmup_epochs or raise epochs."),
    ({"phases.0.warmup_epochs": -0.5}, "phases[0] ('frozen_base'): warmup_epochs=-0.5 must be"),
    ({"data.validation_split": 1.0}, "data.validation_split=1.0 must be in [0, 1)."),
    ({"model.dtype": "float16"}, "model.dtype='float16' is not one of"),
    ({"phases.1.batchnorm": "frozen"}, "phases[1] ('fine_tune'): batchnorm='frozen' is not one "
     "of ('inference', 'batch_stats')."),
    ({"phases.0.epochs": 0}, "phases[0] ('frozen_base'): epochs=0 must be at least 1."),
    ({"phases": ()}, "config.phases is empty: give at least one phase."),
    # A ValueError of the module that owns the setting arrives as a ConfigError.
    ({"phases.0.rules": ("thaw:.*",)}, "freeze rule"),
])
def test_bad_settings_are_one_config_error(overrides, message):
  config = override(default.get_config(), **overrides)
  with pytest.raises(checks.ConfigError) as e:
    checks.check_config(config, ONE_DEVICE)
  assert message in str(e.value)


def test_the_default_config_passes():
  checks.check_config(default.get_config(), ONE_DEVICE)


@pytest.mark.parametrize("key, value, message", [
    ("source", "images", r"data.source='images' is not one of \('auto', 'idx', 'tfds', "
     r"'folder'\)"),
    ("test_split", 0.85, r"data.test_split=0.85 must be in \[0, 1\) and leave training images"),
    ("crop_scale", (0.5, 0.2), r"data.crop_scale=\(0.5, 0.2\) must be \(low, high\)"),
    ("eval_crop", 0.0, r"data.eval_crop=0.0 must be in \(0, 1\]"),
    ("max_memory_gb", 0.0, "data.max_memory_gb=0.0 must be positive"),
])
def test_bad_data_settings_are_refused(key, value, message):
  config = default.get_config()
  config.data[key] = value
  with pytest.raises(ValueError, match=message):
    checks.check_config(config, sharding.data_mesh())


def test_batch_size_must_divide_over_the_devices(tiny_idx_dir):
  three_devices = types.SimpleNamespace(shape={"data": 3})
  with pytest.raises(ValueError, match=r"batch_size=16 must be a positive multiple of the 3 "
                     r"devices in the data mesh; use e.g. --config.batch_size=15 or 18."):
    checks.check_config(tiny_config(tiny_idx_dir), three_devices)


def test_as_config_error_keeps_the_message_and_the_cause():
  with pytest.raises(checks.ConfigError, match="^bad value$") as e:
    with checks.as_config_error():
      raise ValueError("bad value")
  assert isinstance(e.value.__cause__, ValueError)
  with pytest.raises(TypeError):  # Only ValueErrors are the user's.
    with checks.as_config_error():
      raise TypeError("a bug")

# ---------------------------------------------------------------------------------------------
# The fingerprint.
# ---------------------------------------------------------------------------------------------


def test_fingerprint_names_what_a_checkpoint_must_agree_with():
  config = default.get_config()
  assert checks.config_fingerprint(config, "idx sha256:ab", "none") == {
      "data.name": "mnist", "data.identity": "idx sha256:ab", "model.weights": "none",
      "model.name": "mobilenet_v2", "model.alpha": 1.0, "batch_size": 32, "seed": 0,
      "phases": [["frozen_base", ["train:predictions/.*", "freeze:.*"], "adam", False],
                 ["fine_tune", ["freeze:layers[:100]", "train:.*"], "adam", False]]}


@pytest.mark.parametrize("overrides, changed", [
    ({"seed": 1}, ["seed"]), ({"batch_size": 16}, ["batch_size"]),
    ({"phases.1.optimizer": "sgd"}, ["phases"]), ({"phases.0.ema_decay": 0.9}, ["phases"]),
    ({"phases.0.epochs": 5, "phases.1.learning_rate": 1.0, "max_to_keep": 3}, []),
])
def test_fingerprint_changes_with_what_shapes_the_state_or_the_order(overrides, changed):
  before = checks.config_fingerprint(default.get_config(), "d", "w")
  after = checks.config_fingerprint(override(default.get_config(), **overrides), "d", "w")
  assert sorted(k for k in before if before[k] != after[k]) == changed


def test_fingerprint_changes_with_one_pixel_of_the_data(tmp_path):
  folder = write_idx_folder(tmp_path / "a")
  first = idx.load_idx_folder(folder, "digits").identity
  assert first.startswith("idx sha256:") and first == idx.load_idx_folder(folder,
                                                                          "digits").identity
  images = np.zeros((5, 4, 4), np.uint8)
  images[4, 3, 3] = 1
  write_idx(folder / "train-images-idx3-ubyte.gz", images)
  second = idx.load_idx_folder(folder, "digits").identity
  config = default.get_config()
  before, after = (checks.config_fingerprint(config, identity, "none")
                   for identity in (first, second))
  assert [k for k in before if before[k] != after[k]] == ["data.identity"]
