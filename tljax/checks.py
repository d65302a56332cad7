"""Configuration checks: every user mistake fails here, before data, weights or compilation;
and the fingerprint a checkpoint must match to be resumed.

Each check raises :class:`ConfigError` naming the setting, what it must be and how to fix it.
Modules that own a setting check it themselves (``freezing``, ``optim``, ``selection``, the
backbone's ``check_config``); their ValueErrors arrive here as ConfigErrors.
"""

import contextlib
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tljax import export, freezing, models, optim, selection, sharding, steps
from tljax.data import transforms
from tljax.models.layer_stack import LayerStack

BATCHNORM_MODES = ("inference", "batch_stats")
CACHE_MODES = ("auto", "off")
SOURCES = ("auto", "idx", "tfds", "folder")


class ConfigError(ValueError):
  """A setting is out of range, contradicts another or cannot work on this machine."""


@contextlib.contextmanager
def as_config_error():
  """A ValueError raised inside (by the modules that check their own settings) becomes
  ConfigError, with the same message."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


@as_config_error()
def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises ConfigError naming the first bad setting and how to fix it."""
  def expect(ok: bool, message: str):
    if not ok:
      raise ConfigError(message)

  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  expect(config.max_to_keep >= 1, f"max_to_keep={config.max_to_keep} must be at least 1: a "
         "restart resumes from the latest checkpoint.")
  expect(config.checkpoint_every_steps >= 0,
         f"checkpoint_every_steps={config.checkpoint_every_steps} must be >= 0 (0 = only at "
         "epoch and phase ends).")
  expect(config.steps_per_dispatch >= 1,
         f"steps_per_dispatch={config.steps_per_dispatch} must be at least 1.")
  expect(config.data.train_examples >= 0,
         f"data.train_examples={config.data.train_examples} must be >= 0 (0 = all).")
  expect(0 <= config.data.validation_split < 1,
         f"data.validation_split={config.data.validation_split} must be in [0, 1).")
  expect(config.data.scale in transforms.SCALES,
         f"data.scale={config.data.scale!r} is not one of {tuple(transforms.SCALES)}.")
  expect(config.data.augment_shift >= 0,
         f"data.augment_shift={config.data.augment_shift} must be >= 0.")
  _check_data_config(config.data, expect)
  _check_audit_config(config.audit, expect)
  backbone = models.backbone(config.model.name)
  backbone.check_config(config.model)
  expect(config.model.dtype in models.DTYPES,
         f"model.dtype={config.model.dtype!r} is not one of {tuple(models.DTYPES)}.")
  expect(0 <= config.model.bn_momentum < 1,
         f"model.bn_momentum={config.model.bn_momentum} must be in [0, 1).")
  unknown = sorted(set(config.export.formats) - set(export.FORMATS))
  expect(not unknown, f"export.formats={tuple(config.export.formats)}: {unknown} not among "
         f"{export.FORMATS}.")
  expect(config.export.max_int8_drop >= 0,
         f"export.max_int8_drop={config.export.max_int8_drop} must be >= 0 (accuracy points).")
  expect(config.class_weighting in steps.CLASS_WEIGHTING,
         f"class_weighting={config.class_weighting!r} is not one of {steps.CLASS_WEIGHTING}; "
         "use 'balanced' to weigh rare classes up, 'none' to weigh every example alike.")
  expect(isinstance(config.calibrate, bool),
         f"calibrate={config.calibrate!r} must be True or False.")
  expect(len(config.phases) >= 1, "config.phases is empty: give at least one phase.")
  for i, phase in enumerate(config.phases):
    where = f"phases[{i}] ({phase.name!r})"
    expect(phase.epochs >= 1, f"{where}: epochs={phase.epochs} must be at least 1.")
    expect(0 <= phase.warmup_epochs <= phase.epochs,
           f"{where}: warmup_epochs={phase.warmup_epochs} must be in [0, epochs={phase.epochs}]"
           ": the warmup is part of the phase. Lower warmup_epochs or raise epochs.")
    expect(math.isfinite(phase.learning_rate) and phase.learning_rate > 0,
           f"{where}: learning_rate={phase.learning_rate} must be a positive finite number.")
    expect(phase.batchnorm in BATCHNORM_MODES,
           f"{where}: batchnorm={phase.batchnorm!r} is not one of {BATCHNORM_MODES}.")
    expect(phase.cache_prefix in CACHE_MODES,
           f"{where}: cache_prefix={phase.cache_prefix!r} is not one of {CACHE_MODES}.")
    freezing.parse_rules(freezing.expand_presets(phase.rules, backbone.PRESETS))
    optim.make_optimizer(phase, steps_per_epoch=1)
    selection.check(phase, config.data.validation_split > 0, where)


def _check_data_config(data_config, expect) -> None:
  expect(data_config.source in SOURCES,
         f"data.source={data_config.source!r} is not one of {SOURCES}.")
  expect(0 <= data_config.test_split < 1 and
         data_config.validation_split + data_config.test_split < 1,
         f"data.test_split={data_config.test_split} must be in [0, 1) and leave training "
         f"images beside data.validation_split={data_config.validation_split}.")
  low, high = data_config.crop_scale
  expect(0 < low <= high <= 1,
         f"data.crop_scale={tuple(data_config.crop_scale)} must be (low, high) with "
         "0 < low <= high <= 1 (area fractions).")
  low, high = data_config.crop_ratio
  expect(0 < low <= high, f"data.crop_ratio={tuple(data_config.crop_ratio)} must be "
         "(low, high) with 0 < low <= high (width / height).")
  expect(0 < data_config.eval_crop <= 1,
         f"data.eval_crop={data_config.eval_crop} must be in (0, 1] (1 = whole image).")
  expect(data_config.image_size >= 0,
         f"data.image_size={data_config.image_size} must be >= 0 (0 = from input_size).")
  expect(data_config.stream in ("auto", "on", "off"),
         f"data.stream={data_config.stream!r} is not one of ('auto', 'on', 'off').")
  expect(data_config.max_memory_gb > 0,
         f"data.max_memory_gb={data_config.max_memory_gb} must be positive.")


def _check_audit_config(audit_config, expect) -> None:
  expect(0 < audit_config.near_duplicate_threshold < 1,
         f"audit.near_duplicate_threshold={audit_config.near_duplicate_threshold} must be in "
         "(0, 1): a cosine similarity (0.86, the default, was measured: docs/audit.md).")
  expect(audit_config.folds >= 2,
         f"audit.folds={audit_config.folds} must be at least 2 (each fold's probabilities come "
         "from a head fitted on the others).")
  expect(audit_config.feature_max_examples >= 0,
         f"audit.feature_max_examples={audit_config.feature_max_examples} must be >= 0 (0: "
         "exact duplicates and class counts only).")
  expect(audit_config.max_listed >= 1,
         f"audit.max_listed={audit_config.max_listed} must be at least 1.")


def check_memory(config: ml_collections.ConfigDict, model: LayerStack,
                 abstract_variables: Any, mesh) -> None:
  """Refuses an input size whose training activations cannot fit in a device's memory.

  The estimate (every layer's output for a training batch, as kept for the backward pass)
  is rough, so only a size that clearly cannot work is refused.
  """
  size = config.model.input_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  names = tuple(layer.name for layer in model.layers)
  outputs = jax.eval_shape(lambda v, x: model.apply(v, x, capture=names), abstract_variables, x)
  per_image = sum(math.prod(o.shape) * o.dtype.itemsize for o in jax.tree.leaves(outputs))
  needed = per_image * config.batch_size // mesh.devices.size
  device = mesh.devices.flat[0]
  available = _memory_bytes(device)
  if needed > available:
    fits = int(size * math.sqrt(available / needed))
    raise ConfigError(
        f"model.input_size={size}: a training batch of {config.batch_size} images needs about "
        f"{needed / 2**30:,.0f} GiB of activations per device, more than the "
        f"{available / 2**30:,.1f} GiB of memory of {device.platform} device {device.id}. "
        f"Lower model.input_size (about {fits} fits) or batch_size.")


def _memory_bytes(device) -> int:
  """An accelerator's memory, or the host's physical memory for the CPU."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def config_fingerprint(config: ml_collections.ConfigDict, data_identity: str,
                       weights_identity: str) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed: the settings that shape the state and
  the data order, the data itself (``dataset.Dataset.identity``) and the pretrained weights
  (``weights.identity``)."""
  return {"data.name": config.data.name, "data.identity": data_identity,
          "model.weights": weights_identity, "model.name": config.model.name,
          "model.alpha": config.model.alpha,
          "batch_size": config.batch_size, "seed": config.seed,
          "phases": [[p.name, list(p.rules), p.optimizer, p.ema_decay > 0]
                     for p in config.phases]}
