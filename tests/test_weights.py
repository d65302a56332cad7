"""Tests of tljax.models.weights: the .h5 mapping, its errors, and download and cache, all offline."""

import functools
import hashlib
import os
import shutil
import socket

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models import weights
from tljax.models import mobilenet_v2
from tljax.models.mobilenet_v2 import MobileNetV2

# The mapping under test, written out: Keras weight name -> Flax (collection, name), by layer kind.
EXPECTED_MAPPING = {
    "conv": [("kernel", "params", "kernel")],
    "depthwise": [("depthwise_kernel", "params", "depthwise_kernel")],
    "bn": [("gamma", "params", "scale"), ("beta", "params", "bias"),
           ("moving_mean", "batch_stats", "mean"), ("moving_variance", "batch_stats", "var")],
    "dense": [("kernel", "params", "kernel"), ("bias", "params", "bias")],
}
DUMMY = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
NO_TOP = MobileNetV2(alpha=0.35, include_top=False)
TOP = MobileNetV2(alpha=0.35, include_top=True, num_classes=10)
NO_TOP_NAME = mobilenet_v2.weights_file_name(0.35, 96, include_top=False)


@functools.cache
def _abstract(model):
  return jax.eval_shape(model.init, jax.random.key(0), DUMMY)


def write_keras_h5(path, model, *, style="tf.keras", seed=0, group_name=None):
  """Writes random weights for ``model`` in the legacy layout; returns {layer: {name: array}}.

  ``style`` "tf.keras" names weights ``Conv1/kernel:0`` and ``.../depthwise_kernel:0`` (the
  published files); "keras3" writes ``Conv1/kernel`` and ``.../kernel`` for depthwise layers.
  """
  abstract = _abstract(model)
  rng = np.random.default_rng(seed)
  written = {}
  with h5py.File(path, "w") as f:
    root = f.create_group(group_name) if group_name else f
    root.attrs["layer_names"] = np.array([l.name.encode() for l in model.layers], dtype="S")
    root.attrs["backend"] = b"tensorflow"
    for layer in model.layers:
      group = root.create_group(layer.name)
      names = []
      for keras_name, collection, var in EXPECTED_MAPPING.get(layer.kind, []):
        value = rng.standard_normal(abstract[collection][layer.name][var].shape, np.float32)
        written.setdefault(layer.name, {})[keras_name] = value
        if style == "keras3":
          keras_name = "kernel" if keras_name == "depthwise_kernel" else keras_name
          names.append(f"{layer.name}/{keras_name}")
        else:
          names.append(f"{layer.name}/{keras_name}:0")
        group[names[-1]] = value
      group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
    if style == "keras3":
      root.create_group("top_level_model_weights").attrs["weight_names"] = np.array([], "S")
  return written


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
  """No test reads or writes the real download caches."""
  monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "tljax_cache"))
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Legacy .h5 files of random weights: alpha 0.35 with and without a 10-class top."""
  root = tmp_path_factory.mktemp("h5")
  made = {}
  for key, model in (("no_top", NO_TOP), ("top", TOP)):
    made[key] = root / f"{key}.h5"
    made[f"{key}_values"] = write_keras_h5(made[key], model)
  return made


@pytest.fixture(scope="module")
def init_variables():
  """``model.init`` of ``TOP``, the reference for layers left to initialisation."""
  return weights.load_pretrained("none", TOP, input_size=32, rng=jax.random.key(7))


def _assert_loaded(variables, model, written):
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), _abstract(model))
  kinds = {layer.name: layer.kind for layer in model.layers}
  for layer, values in written.items():
    for keras_name, collection, var in EXPECTED_MAPPING[kinds[layer]]:
      np.testing.assert_array_equal(variables[collection][layer][var], values[keras_name],
                                    err_msg=f"{layer}/{keras_name}")


# ---------------------------------------------------------------------------------------------
# The mapping.


@pytest.mark.parametrize("style", ["tf.keras", "keras3"])
@pytest.mark.parametrize("model", [NO_TOP, TOP], ids=["no_top", "top"])
def test_load_maps_every_keras_weight_onto_its_flax_variable(tmp_path, style, model):
  path = tmp_path / "w.h5"
  written = write_keras_h5(path, model, style=style, seed=3)
  variables = weights.load_keras_h5(path, model)
  assert set(variables) == {"params", "batch_stats"}
  assert len(variables["params"]) == 104 + model.include_top
  assert len(variables["batch_stats"]) == 52
  _assert_loaded(variables, model, written)


def test_load_reads_weights_under_a_model_weights_group(tmp_path):
  path = tmp_path / "full_model.h5"
  written = write_keras_h5(path, NO_TOP, group_name="model_weights")
  _assert_loaded(weights.load_keras_h5(path, NO_TOP), NO_TOP, written)


def test_read_keras_h5_skips_weightless_layers_and_strips_suffixes(files):
  read = weights.read_keras_h5(files["no_top"])
  assert list(read) == list(files["no_top_values"])
  assert set(read["bn_Conv1"]) == {"gamma", "beta", "moving_mean", "moving_variance"}
  assert set(read["expanded_conv_depthwise"]) == {"depthwise_kernel"}
  assert "Conv1_relu" not in read and "block_1_pad" not in read


# ---------------------------------------------------------------------------------------------
# Bad files each raise a WeightsError that names the file and says what to do.


def test_truncated_file(files, tmp_path):
  path = tmp_path / "truncated.h5"
  data = files["no_top"].read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(weights.WeightsError, match="corrupt or truncated") as error:
    weights.load_keras_h5(path, NO_TOP)
  assert str(path) in str(error.value)
  assert "delete it and download it again" in str(error.value)


def test_html_page_saved_as_h5(tmp_path):
  path = tmp_path / "mobilenet_v2_weights.h5"
  path.write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
  with pytest.raises(weights.WeightsError, match="is not an HDF5 file") as error:
    weights.load_keras_h5(path, NO_TOP)
  assert str(path) in str(error.value)
  assert "looks like an HTML page" in str(error.value)
  assert "delete it and download the weights again" in str(error.value)


def test_missing_file(tmp_path):
  path = tmp_path / "absent.h5"
  with pytest.raises(weights.WeightsError, match=f"weights file {path} does not exist"):
    weights.load_keras_h5(path, NO_TOP)


def test_hdf5_that_is_not_the_legacy_layout(tmp_path):
  path = tmp_path / "model.weights.h5"
  with h5py.File(path, "w") as f:
    f.create_group("layers").create_group("conv2d")
  with pytest.raises(weights.WeightsError, match="not a Keras legacy weights file") as error:
    weights.load_keras_h5(path, NO_TOP)
  assert str(path) in str(error.value)


def test_wrong_alpha_names_the_layer_both_shapes_and_the_file_alpha(files):
  with pytest.raises(weights.WeightsError) as error:
    weights.load_keras_h5(files["no_top"], MobileNetV2(alpha=1.0, include_top=False))
  message = str(error.value)
  assert message.startswith(f"{files['no_top']} does not fit MobileNetV2(alpha=1.0,")
  assert ("Conv1/kernel: shape (3, 3, 3, 16) in the file, (3, 3, 3, 32) in the model "
          "(params/Conv1/kernel)") in message
  assert "bn_Conv1/moving_variance: shape (16,) in the file, (32,) in the model" in message
  assert "more" in message  # The list is cut short.
  assert "Hint: the file is for alpha=0.35; set model.alpha=0.35" in message


@pytest.mark.parametrize("unlist", [False, True], ids=["group_deleted", "layer_removed"])
def test_missing_layer_is_listed(files, tmp_path, unlist):
  path = tmp_path / "missing.h5"
  shutil.copy(files["no_top"], path)
  with h5py.File(path, "r+") as f:
    del f["block_5_expand"]
    del f["block_5_expand_BN"]
    if unlist:
      names = [n for n in f.attrs["layer_names"] if not n.startswith(b"block_5_expand")]
      f.attrs["layer_names"] = np.array(names)
  with pytest.raises(weights.WeightsError) as error:
    weights.load_keras_h5(path, NO_TOP)
  assert str(path) in str(error.value)
  assert "2 model layers are not in the file: ['block_5_expand', 'block_5_expand_BN']" \
      in str(error.value)


def test_missing_weight_in_a_layer(files, tmp_path):
  path = tmp_path / "no_variance.h5"
  shutil.copy(files["no_top"], path)
  with h5py.File(path, "r+") as f:
    group = f["block_3_project_BN"]
    del group["block_3_project_BN/moving_variance:0"]
    group.attrs["weight_names"] = group.attrs["weight_names"][:3]
  with pytest.raises(weights.WeightsError, match="block_3_project_BN lacks batch_stats/var"):
    weights.load_keras_h5(path, NO_TOP)


def test_file_with_a_head_into_a_model_without_one(files):
  with pytest.raises(weights.WeightsError) as error:
    weights.load_keras_h5(files["top"], NO_TOP)
  message = str(error.value)
  assert "layer 'predictions' is in the file but not in the model" in message
  assert "Hint: the file has a classification head ('predictions'); use a _no_top file" in message
  variables = weights.load_keras_h5(files["top"], NO_TOP, dont_load=("predictions",))
  _assert_loaded(variables, NO_TOP, {k: v for k, v in files["top_values"].items()
                                     if k != "predictions"})


def test_file_without_a_head_into_a_model_with_one(files):
  with pytest.raises(weights.WeightsError) as error:
    weights.load_keras_h5(files["no_top"], TOP)
  assert "1 model layers are not in the file: ['predictions']" in str(error.value)
  assert "pass dont_load=('predictions',) to initialise the model's head" in str(error.value)


def test_head_with_other_classes(files):
  with pytest.raises(weights.WeightsError) as error:
    weights.load_keras_h5(files["top"], MobileNetV2(alpha=0.35, num_classes=5))
  message = str(error.value)
  assert "predictions/kernel: shape (1280, 10) in the file, (1280, 5) in the model" in message
  assert "the file's head has 10 classes and the model 5; set num_classes=10" in message


# ---------------------------------------------------------------------------------------------
# dont_load and initialisation.


def test_dont_load_takes_the_head_from_init(files, init_variables):
  variables = weights.load_keras_h5(files["no_top"], TOP, dont_load=("predictions",),
                                    rng=jax.random.key(7))
  _assert_loaded(variables, TOP, files["no_top_values"])
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(variables["params"]["predictions"][name],
                                  init_variables["params"]["predictions"][name])


def test_dont_load_several_layers_matches_a_full_init(files, init_variables):
  variables = weights.load_keras_h5(files["top"], TOP, dont_load=("block_16_.*", "predictions"),
                                    rng=jax.random.key(7))
  for collection, layers in variables.items():
    for layer, values in layers.items():
      from_init = layer.startswith("block_16_") or layer == "predictions"
      for name, value in values.items():
        if from_init:
          np.testing.assert_array_equal(value, init_variables[collection][layer][name])
  np.testing.assert_array_equal(variables["params"]["Conv_1"]["kernel"],
                                files["top_values"]["Conv_1"]["kernel"])


def test_load_pretrained_none_is_model_init(init_variables):
  assert jax.tree.map(lambda a: a.shape, init_variables) == \
      jax.tree.map(lambda a: a.shape, _abstract(TOP))
  np.testing.assert_array_equal(init_variables["batch_stats"]["bn_Conv1"]["var"], np.ones(16))
  assert float(jnp.std(init_variables["params"]["Conv1"]["kernel"])) > 0.05


def test_dont_load_needs_an_rng(files):
  with pytest.raises(ValueError, match=r"initialises \['predictions'\].*needs rng="):
    weights.load_keras_h5(files["no_top"], TOP, dont_load=("predictions",))


def test_dont_load_pattern_must_match_a_layer(files):
  with pytest.raises(ValueError, match="dont_load pattern 'prediction' matches no layer"):
    weights.load_keras_h5(files["no_top"], TOP, dont_load=("prediction",), rng=jax.random.key(0))
  with pytest.raises(TypeError, match=r"write \('predictions',\)"):
    weights.load_keras_h5(files["no_top"], TOP, dont_load="predictions")


def test_load_pretrained_initialises_a_missing_head(files, init_variables):
  variables = weights.load_pretrained(str(files["no_top"]), TOP, input_size=96,
                                      rng=jax.random.key(7))
  _assert_loaded(variables, TOP, files["no_top_values"])
  np.testing.assert_array_equal(variables["params"]["predictions"]["kernel"],
                                init_variables["params"]["predictions"]["kernel"])


def test_load_pretrained_hints_only_what_a_run_can_set(files):
  """The trainer sets a new head itself, so its message names model.alpha, never dont_load
  or num_classes (which are not config keys)."""
  with pytest.raises(weights.WeightsError) as error:
    weights.load_pretrained(str(files["top"]), MobileNetV2(alpha=0.5, num_classes=5),
                            input_size=32, rng=jax.random.key(0))
  hints = [line for line in str(error.value).split("\n") if line.startswith("Hint:")]
  assert hints == ["Hint: the file is for alpha=0.35; set model.alpha=0.35 to match, or use "
                   "the file for alpha=0.5."]


def test_load_pretrained_keeps_a_matching_head(files):
  variables = weights.load_pretrained(str(files["top"]), TOP, input_size=32,
                                      rng=jax.random.key(7))
  _assert_loaded(variables, TOP, files["top_values"])


# ---------------------------------------------------------------------------------------------
# Addresses and the choice of file.


def test_resolve_weights_none_and_local_paths(files, tmp_path):
  kwargs = dict(input_size=96, include_top_file=False)
  assert weights.resolve_weights("none", NO_TOP, **kwargs) is None
  assert weights.resolve_weights(str(files["no_top"]), NO_TOP, **kwargs) == files["no_top"]
  missing = str(tmp_path / "nope.h5")
  with pytest.raises(weights.WeightsError,
                     match=f"model.weights='{missing}': no such file. Pass 'imagenet'"):
    weights.resolve_weights(missing, NO_TOP, **kwargs)


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_fetch_checks_known_sha256_and_names_the_local_alternative(server, tmp_path,
                                                                   monkeypatch):
  server.files["/w.h5"] = b"good weights"
  monkeypatch.setitem(weights.KNOWN_SHA256, "w.h5", hashlib.sha256(b"good weights").hexdigest())
  (tmp_path / "w.h5").write_bytes(b"stale or damaged")
  assert weights.fetch(f"{server.url}/w.h5", tmp_path).read_bytes() == b"good weights"
  with pytest.raises(weights.WeightsError, match=r"/absent.h5 answered HTTP 404 .*"
                     r"--config.model.weights=/path/to/absent.h5"):
    weights.fetch(f"{server.url}/absent.h5", tmp_path)


def test_weights_url_is_the_backbones_unless_a_mirror_is_set(monkeypatch):
  model = MobileNetV2(alpha=1.0)
  monkeypatch.delenv("TLJAX_WEIGHTS_URL", raising=False)
  keras_url = model.keras_weights_url(224, include_top=False)
  assert weights.weights_url(model, 224, include_top=False) == keras_url
  monkeypatch.setenv("TLJAX_WEIGHTS_URL", "http://127.0.0.1:8000/keras")
  assert weights.weights_url(model, 224, include_top=False) == (
      "http://127.0.0.1:8000/keras/"
      "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")


def test_resolve_imagenet_downloads_the_file_keras_would_load(server, files, tmp_path,
                                                              monkeypatch):
  monkeypatch.setenv("TLJAX_WEIGHTS_URL", server.url)
  server.files[f"/{NO_TOP_NAME}"] = files["no_top"].read_bytes()
  path = weights.resolve_weights("imagenet", NO_TOP, input_size=96, include_top_file=False,
                                 cache_dir=tmp_path)
  assert path == tmp_path / NO_TOP_NAME
  with pytest.raises(weights.WeightsError, match="answered HTTP 404"):
    weights.resolve_weights("imagenet", NO_TOP, input_size=100, include_top_file=True,
                            cache_dir=tmp_path)
  assert server.requests == [f"/{NO_TOP_NAME}",
                             "/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224.h5"]


def test_load_pretrained_imagenet_end_to_end(server, files, tmp_path, monkeypatch):
  monkeypatch.setenv("TLJAX_WEIGHTS_URL", server.url)
  server.files[f"/{NO_TOP_NAME}"] = files["no_top"].read_bytes()
  variables = weights.load_pretrained("imagenet", NO_TOP, input_size=96, rng=jax.random.key(0),
                                      cache_dir=tmp_path)
  _assert_loaded(variables, NO_TOP, files["no_top_values"])


def test_resolve_imagenet_uses_the_keras_cache(tmp_path, monkeypatch):
  keras_copy = tmp_path / "keras" / "models" / NO_TOP_NAME
  keras_copy.parent.mkdir(parents=True)
  keras_copy.write_bytes(b"keras cached")
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  monkeypatch.setenv("TLJAX_WEIGHTS_URL", f"http://127.0.0.1:{_closed_port()}")
  kwargs = dict(include_top_file=False, cache_dir=tmp_path / "tljax")
  assert weights.resolve_weights("imagenet", NO_TOP, input_size=96, **kwargs) == keras_copy
  with pytest.raises(weights.WeightsError, match="could not be reached"):
    weights.resolve_weights("imagenet", NO_TOP, input_size=128, **kwargs)
  assert os.listdir(tmp_path / "tljax") == []
  (tmp_path / "tljax" / NO_TOP_NAME).write_bytes(b"own cache")  # Takes precedence.
  assert weights.resolve_weights("imagenet", NO_TOP, input_size=96, **kwargs) == \
      tmp_path / "tljax" / NO_TOP_NAME


def test_non_finite_weights_are_refused_naming_the_layer(files, tmp_path):
  path = tmp_path / "nan.h5"
  path.write_bytes(files["no_top"].read_bytes())
  with h5py.File(path, "r+") as f:
    kernel = f["block_3_project"]["block_3_project/kernel:0"]
    kernel[0, 0, 0, :2] = [np.nan, np.inf]
  with pytest.raises(weights.WeightsError, match=f"{path}: layer 'block_3_project' weight "
                     "'kernel' holds 2 NaN or infinite values; the file is damaged"):
    weights.load_pretrained(str(path), TOP, input_size=96, rng=jax.random.key(7))
