"""Keras weights files (legacy HDF5) as Flax variables of a backbone; which file "imagenet" means.

The files ``keras.applications`` publishes (e.g. for MobileNetV2) hold one HDF5 group per
layer, whose ``weight_names`` attribute lists names such as
``block_1_depthwise/depthwise_kernel:0``. A backbone keeps every variable under its Keras layer
name, so the port is a mapping by layer name and by the last component of the weight name
(``_KERAS_TO_FLAX``, by layer kind), checked strictly both ways. Where the files are published
is the backbone's to say (``keras_weights_url``).

Typical use, the one call the trainer makes::

  variables = load_pretrained("imagenet", model, input_size=96, rng=jax.random.key(0))
"""

import functools
import logging
import os
import pathlib
import re
from collections.abc import Callable, Sequence

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from tljax import download
from tljax.models.layer_stack import LayerStack

# A mirror of Keras's weights files (same names), e.g. a local server or a bucket.
MIRROR_ENV = "TLJAX_WEIGHTS_URL"
# sha256 of the published files, by file name. keras.applications checks none for MobileNetV2
# and none is recorded here until verified against a download; files without one are cached
# unchecked (a damaged file then fails to load with a message saying to delete it).
KNOWN_SHA256: dict[str, str] = {}
_MAX_LISTED = 12

# Keras weight name (last path component) -> (Flax collection, variable), by layer kind.
_KERAS_TO_FLAX = {
    "conv": {"kernel": ("params", "kernel")},
    # tf.keras calls it depthwise_kernel; Keras 3's legacy writer calls it kernel.
    "depthwise": {"depthwise_kernel": ("params", "depthwise_kernel"),
                  "kernel": ("params", "depthwise_kernel")},
    "bn": {"gamma": ("params", "scale"), "beta": ("params", "bias"),
           "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")},
    "dense": {"kernel": ("params", "kernel"), "bias": ("params", "bias")},
}

KerasWeights = dict[str, dict[str, np.ndarray]]  # {layer name: {weight name: array}}
Variables = dict[str, dict[str, dict[str, jax.Array]]]  # {collection: {layer: {name: array}}}


class WeightsError(ValueError):
  """A weights file that cannot be found, downloaded, read or mapped onto the model."""


# ---------------------------------------------------------------------------------------------
# Reading the legacy HDF5 layout.


def read_keras_h5(path: str | os.PathLike) -> KerasWeights:
  """Reads a Keras legacy-HDF5 weights file into ``{layer: {weight: array}}``.

  Only layers that hold weights appear, in file order; weight names are reduced to their last
  component without ``:0``, e.g. ``{"bn_Conv1": {"gamma": ..., "moving_mean": ...}}``.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"weights file {path} does not exist; pass the path of a Keras "
                       ".h5 weights file, 'imagenet' or 'none'.")
  _check_readable(path)
  if not h5py.is_hdf5(path):
    with open(path, "rb") as f:
      looks_html = f.read(512).lstrip().startswith(b"<")
    raise WeightsError(
        f"{path} is not an HDF5 file"
        f"{' (it looks like an HTML page, e.g. a saved download error)' if looks_html else ''}; "
        "delete it and download the weights again, or pass a valid Keras .h5 weights file.")
  try:
    with h5py.File(path, "r") as f:
      return _read_layers(f, path)
  except (OSError, KeyError, RuntimeError) as e:  # h5py's errors for damaged files.
    raise WeightsError(f"{path} is a corrupt or truncated HDF5 file ({e}); delete it and "
                       "download it again, or pass a valid Keras .h5 weights file.") from e


def _check_readable(path: pathlib.Path) -> None:
  try:
    with open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise WeightsError(f"weights file {path} cannot be read ({e.strerror or e}); check its "
                       "permissions.") from None


def _read_layers(f: h5py.File, path: pathlib.Path) -> KerasWeights:
  group = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
  layer_names = _string_list_attr(group, "layer_names")
  if layer_names is None:
    raise WeightsError(
        f"{path} is HDF5 but not a Keras legacy weights file (no 'layer_names' attribute). "
        "Keras 3 '.weights.h5' files are not supported; pass a keras.applications file such as "
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5.")
  weights = {}
  for layer in layer_names:
    if layer not in group:  # Listed without a group: no weights to read.
      continue
    layer_weights = {}
    for name in _string_list_attr(group[layer], "weight_names") or ():
      short = name.split("/")[-1].removesuffix(":0")
      if short in layer_weights:
        raise WeightsError(f"{path}: layer {layer!r} holds two weights called {short!r}.")
      layer_weights[short] = np.asarray(group[layer][name])
      bad = int(np.size(layer_weights[short]) - np.isfinite(layer_weights[short]).sum())
      if bad:
        raise WeightsError(f"{path}: layer {layer!r} weight {short!r} holds {bad} NaN or "
                           "infinite values; the file is damaged. Download it again, or pass "
                           "another weights file.")
    if layer_weights:
      weights[layer] = layer_weights
  return weights


def _string_list_attr(group: h5py.Group, name: str) -> list[str] | None:
  """An attribute of strings, which Keras splits into ``name0``, ``name1``... when large."""
  if name in group.attrs:
    values = list(group.attrs[name])
  elif f"{name}0" in group.attrs:
    values, i = [], 0
    while f"{name}{i}" in group.attrs:
      values.extend(group.attrs[f"{name}{i}"])
      i += 1
  else:
    return None
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


# ---------------------------------------------------------------------------------------------
# Mapping onto the model.


def load_keras_h5(path: str | os.PathLike, model: LayerStack, *,
                  dont_load: Sequence[str] = (), rng: jax.Array | None = None) -> Variables:
  """Loads a Keras legacy-HDF5 file as ``{"params", "batch_stats"}`` for ``model``.

  Strict: every layer with weights in the file maps onto a model layer, every model variable
  comes from the file, and every shape matches, except for layers whose name fully matches a
  regex in ``dont_load``: those are ignored in the file and initialised with ``model.init(rng)``.

  Example: ``load_keras_h5(path, MobileNetV2(num_classes=10), dont_load=("predictions",),
  rng=jax.random.key(0))`` loads an ImageNet ``_no_top`` file under a fresh 10-class head.
  """
  return _to_variables(read_keras_h5(path), model, pathlib.Path(path), dont_load, rng)


def _to_variables(weights: KerasWeights, model: LayerStack, path: pathlib.Path,
                  dont_load: Sequence[str], rng: jax.Array | None) -> Variables:
  dummy = jax.ShapeDtypeStruct((1, model.MIN_INPUT_SIZE, model.MIN_INPUT_SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)
  skipped = _matcher(dont_load, [*(layer.name for layer in model.layers), *weights])
  variables, problems = _match(weights, model, abstract, skipped)
  if problems:
    raise WeightsError(_mapping_message(path, model, problems, weights,
                                        head_loaded=not skipped("predictions")))
  initialised = [layer.name for layer in model.layers
                 if skipped(layer.name) and any(layer.name in abstract[c] for c in abstract)]
  if initialised:
    _fill_from_init(variables, model, rng, abstract, dummy, initialised)
  logging.info("Loaded %s into %s; initialised %s.", path, _describe(model),
               initialised or "nothing")
  return variables


def _match(weights: KerasWeights, model: LayerStack, abstract: Variables,
           skipped: Callable[[str], bool]) -> tuple[Variables, list[str]]:
  """Places the file's arrays by layer name and kind; lists everything that does not fit."""
  kinds = {layer.name: layer.kind for layer in model.layers}
  variables = {collection: {} for collection in abstract}
  problems, matched = [], set()
  for layer, layer_weights in weights.items():
    if skipped(layer):
      continue
    if layer not in kinds:
      problems.append(f"layer {layer!r} is in the file but not in the model")
      continue
    for name, value in layer_weights.items():
      collection, var = _KERAS_TO_FLAX.get(kinds[layer], {}).get(name, (None, None))
      expected = abstract.get(collection, {}).get(layer, {}).get(var)
      if expected is None:
        problems.append(f"{layer}/{name} (shape {value.shape}) has no counterpart in the model")
        continue
      matched.add((collection, layer, var))
      if value.shape != expected.shape:
        problems.append(f"{layer}/{name}: shape {value.shape} in the file, {expected.shape} in "
                        f"the model ({collection}/{layer}/{var})")
      else:
        variables[collection].setdefault(layer, {})[var] = jnp.asarray(value, expected.dtype)
  wanted = [(c, layer, var) for layer in kinds if not skipped(layer) for c in abstract
            for var in abstract[c].get(layer, {})]
  missing = list(dict.fromkeys(layer for _, layer, _ in wanted if layer not in weights))
  if missing:
    problems.append(f"{len(missing)} model layers are not in the file: {missing}")
  problems += [f"{layer} lacks {c}/{var} in the file" for c, layer, var in wanted
               if layer in weights and (c, layer, var) not in matched]
  return variables, problems


def _matcher(patterns: Sequence[str], names: Sequence[str]) -> Callable[[str], bool]:
  """``name -> bool`` for the names that fully match one of ``patterns``; each must match one."""
  if isinstance(patterns, str):
    raise TypeError(f"dont_load must be a sequence of regexes, got the string {patterns!r}; "
                    f"write ({patterns!r},).")
  compiled = [re.compile(p) for p in patterns]
  for pattern in compiled:
    if not any(pattern.fullmatch(n) for n in names):
      raise ValueError(f"dont_load pattern {pattern.pattern!r} matches no layer of the model or "
                       "the file; patterns must match a whole Keras layer name, e.g. "
                       "'predictions' or 'block_16_.*'.")
  return lambda name: any(p.fullmatch(name) for p in compiled)


def _fill_from_init(variables: Variables, model: LayerStack, rng: jax.Array | None,
                    abstract: Variables, dummy: jax.ShapeDtypeStruct,
                    layers: Sequence[str]) -> None:
  """Sets ``layers`` to their ``model.init(rng, ...)`` values.

  Only the slice of the network that spans ``layers`` is initialised (``start``/``stop``):
  Flax derives each layer's initial values from ``rng`` and the layer's name alone, so they are
  the same as a full ``model.init`` gives, without compiling the whole network.
  """
  if rng is None:
    raise ValueError(f"load_keras_h5 initialises {list(layers)} (dont_load) and needs "
                     "rng=jax.random.key(seed) for that.")
  names = [layer.name for layer in model.layers]
  start = min(names.index(layer) for layer in layers)
  stop = max(names.index(layer) for layer in layers) + 1
  reads = sorted({n for layer in model.layers[start:stop] for n in layer.inputs
                  if names.index(n) < start})
  shapes = jax.eval_shape(functools.partial(model.apply, stop=start, capture=reads),
                          abstract, dummy) if start > 1 else {reads[0]: dummy}
  inputs = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
  fresh = jax.jit(functools.partial(model.init, start=start, stop=stop))(rng, inputs)
  for collection in variables:
    for layer in layers:
      if layer in fresh.get(collection, {}):
        variables[collection][layer] = fresh[collection][layer]


def _mapping_message(path: pathlib.Path, model: LayerStack, problems: Sequence[str],
                     weights: KerasWeights, head_loaded: bool) -> str:
  listed = problems[:_MAX_LISTED]
  more = len(problems) - len(listed)
  lines = [f"{path} does not fit {_describe(model)}:",
           *(f"  - {p}" for p in listed), *([f"  ... and {more} more"] if more else [])]
  lines += [f"Hint: {hint}" for hint in _hints(model, weights, head_loaded)]
  return "\n".join(lines)


def _describe(model: LayerStack) -> str:
  """``MobileNetV2(alpha=1.0, include_top=True, num_classes=10)``: the fields a file must fit."""
  fields = ("alpha", "include_top", "num_classes")
  return f"{type(model).__name__}(" + ", ".join(
      f"{f}={getattr(model, f)}" for f in fields if hasattr(model, f)) + ")"


def _has_head(model: LayerStack) -> bool:
  return any(layer.name == "predictions" for layer in model.layers)


def _hints(model: LayerStack, weights: KerasWeights, head_loaded: bool) -> list[str]:
  """What to change; nothing about the head where it is not loaded (``dont_load``, as the
  trainer does for a head that does not fit)."""
  hints = model.weights_hints(weights)
  if not head_loaded:
    return hints
  head = weights.get("predictions", {}).get("kernel")
  if head is not None and not _has_head(model):
    hints.append("the file has a classification head ('predictions'); use a _no_top file, set "
                 "include_top=True, or pass dont_load=('predictions',).")
  elif head is None and _has_head(model):
    hints.append("the file has no classification head; pass dont_load=('predictions',) to "
                 "initialise the model's head.")
  elif head is not None and head.shape[-1] != model.num_classes:
    hints.append(f"the file's head has {head.shape[-1]} classes and the model "
                 f"{model.num_classes}; set num_classes={head.shape[-1]} or pass "
                 "dont_load=('predictions',) to initialise a new head.")
  return hints


# ---------------------------------------------------------------------------------------------
# Download and cache.


def weights_url(model: LayerStack, input_size: int | tuple[int, int], include_top: bool) -> str:
  """Where the ImageNet weights of ``model`` for ``input_size`` are downloaded from: the
  address keras.applications uses, or the same file under ``$TLJAX_WEIGHTS_URL`` where that
  names a mirror."""
  url = model.keras_weights_url(input_size, include_top)
  mirror = os.environ.get(MIRROR_ENV)
  return f"{mirror.rstrip('/')}/{download.file_name(url)}" if mirror else url


def fetch(url: str, cache_dir: str | os.PathLike | None = None, sha256: str | None = None, *,
          timeout: float = download.TIMEOUT_S) -> pathlib.Path:
  """``download.fetch`` for a weights file: the expected sha256 is ``sha256``, else
  ``KNOWN_SHA256`` by file name; failures are ``WeightsError``s naming the local alternative."""
  name = download.file_name(url)
  instead = f"download {url} elsewhere and pass it with --config.model.weights=/path/to/{name}"
  try:
    return download.fetch(url, cache_dir, sha256 or KNOWN_SHA256.get(name), what="weights",
                          instead=instead, timeout=timeout)
  except download.DownloadError as e:
    raise WeightsError(str(e)) from e


def _keras_cached(name: str) -> pathlib.Path | None:
  """The copy keras.applications already cached (``$KERAS_HOME/models``), if it verifies."""
  keras_home = pathlib.Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()
  path = keras_home / "models" / name
  known = KNOWN_SHA256.get(name)
  if path.is_file() and (known is None or download.sha256_of(path) == known):
    return path
  return None


# ---------------------------------------------------------------------------------------------
# The trainer's entry points.


def resolve_weights(spec: str, model: LayerStack, *, input_size: int | tuple[int, int],
                    include_top_file: bool,
                    cache_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
  """The weights file for ``spec``: "imagenet" (downloaded, cached), "none" (None) or a path.

  For "imagenet", the file Keras would load for ``model`` and ``input_size``
  (``weights_url``); taken from ``cache_dir``, else from Keras's own cache
  (``$KERAS_HOME/models``), else downloaded into ``cache_dir``.
  """
  if spec == "none":
    return None
  if spec == "imagenet":
    url = weights_url(model, input_size, include_top_file)
    cache_dir = pathlib.Path(cache_dir) if cache_dir else download.default_cache_dir()
    name = url.rsplit("/", 1)[-1]
    if not (cache_dir / name).is_file() and (keras_copy := _keras_cached(name)) is not None:
      return keras_copy
    return fetch(url, cache_dir)
  path = pathlib.Path(spec).expanduser()
  if not path.is_file():
    raise WeightsError(f"model.weights={spec!r}: no such file. Pass 'imagenet' (downloaded and "
                       "cached), 'none' (random initialisation) or the path of a Keras "
                       ".h5 weights file.")
  return path


def _resolve_for(spec: str, model: LayerStack, input_size: int | tuple[int, int],
                 cache_dir: str | os.PathLike | None) -> pathlib.Path | None:
  include_top_file = _has_head(model) and model.num_classes == 1000
  return resolve_weights(spec, model, input_size=input_size, include_top_file=include_top_file,
                         cache_dir=cache_dir)


def identity(spec: str, model: LayerStack, *, input_size: int | tuple[int, int],
             cache_dir: str | os.PathLike | None = None) -> str:
  """Which weights ``spec`` gives ``model``: "none", or "sha256:<hex>" of the file."""
  path = _resolve_for(spec, model, input_size, cache_dir)
  if path is None:
    return "none"
  _check_readable(path)
  return f"sha256:{download.sha256_of(path)}"


def load_pretrained(spec: str, model: LayerStack, *, input_size: int | tuple[int, int],
                    rng: jax.Array, cache_dir: str | os.PathLike | None = None) -> Variables:
  """Variables for ``model`` from ``spec`` ("imagenet", "none" or a .h5 path).

  A model with a top of 1000 classes takes the ImageNet classifier; any other top, and a head
  in the file that does not fit the model's classes, is initialised from ``rng``.
  """
  path = _resolve_for(spec, model, input_size, cache_dir)
  if path is None:
    logging.warning("model.weights='none': training from random initialisation, without "
                    "pretrained weights.")
    size = model.MIN_INPUT_SIZE
    return dict(jax.jit(model.init)(rng, jnp.zeros((1, size, size, 3), jnp.float32)))
  weights = read_keras_h5(path)
  head = weights.get("predictions", {}).get("kernel")
  head_fits = head is not None and head.shape[-1] == model.num_classes
  dont_load = ("predictions",) if _has_head(model) and not head_fits else ()
  return _to_variables(weights, model, path, dont_load, rng)
