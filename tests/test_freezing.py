"""Freeze rules -> labels -> masked optimizer: the parameter-masking guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers import BASE, MODEL
from tljax import freezing
from tljax.models.mobilenet_v2 import MobileNetV2

VARIABLES = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
PARAMS = VARIABLES["params"]
PATHS = list(traverse_util.flatten_dict(PARAMS, sep="/"))


def trained_paths(rules):
  labels, _ = freezing.label_params(PARAMS, freezing.parse_rules(rules), BASE)
  return {p for p, l in traverse_util.flatten_dict(labels, sep="/").items() if l == "train"}


@pytest.mark.parametrize("rules, expected", [
    (("train:predictions/.*", "freeze:.*"), {"predictions/kernel", "predictions/bias"}),
    (("freeze:.*_BN/.*", "train:block_16_.*", "freeze:.*"),
     {"block_16_expand/kernel", "block_16_depthwise/depthwise_kernel",
      "block_16_project/kernel"}),
    (("train:layers[-3:]", "freeze:.*"), {"Conv_1/kernel", "Conv_1_bn/scale",
                                           "Conv_1_bn/bias"}),
    (("train:layers[1]", "freeze:.*"), {"Conv1/kernel"}),
])
def test_first_matching_rule_decides(rules, expected):
  assert trained_paths(rules) == expected


def test_layers_100_boundary_is_block_11_expand_relu():
  trained = trained_paths(("freeze:layers[:100]", "train:.*"))
  assert "block_11_expand/kernel" not in trained
  assert "block_11_expand_BN/scale" not in trained
  assert "block_11_depthwise/depthwise_kernel" in trained
  assert "predictions/kernel" in trained


def test_layers_100_matches_keras_trainable_weights():
  import keras  # The reference: the tutorial's exact freezing code.
  base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                        include_top=False, weights=None)
  for layer in base.layers[:100]:
    layer.trainable = False
  keras_trained = {f"{w.path.split('/')[0]}/{w.path.split('/')[-1]}"
                   for w in base.trainable_weights}
  ours = trained_paths(("freeze:layers[:100]", "train:.*")) - {"predictions/kernel",
                                                              "predictions/bias"}
  rename = {"gamma": "scale", "beta": "bias", "kernel": "kernel"}
  keras_trained = {p.rsplit("/", 1)[0] + "/" + (
      "depthwise_kernel" if "depthwise" in p.split("/")[0] and p.endswith("kernel")
      else rename[p.rsplit("/", 1)[1]]) for p in keras_trained}
  assert ours == keras_trained
  assert len(ours) == 6 + 5 * 9 + 3  # block_11 from depthwise on, blocks 12-16, Conv_1.


def test_uncovered_parameters_are_named():
  with pytest.raises(ValueError, match=r"match no freeze rule.*Conv1/kernel.*'train:\.\*'"):
    freezing.label_params(PARAMS, freezing.parse_rules(("train:predictions/.*",)), BASE)


def test_rule_matching_nothing_is_named():
  with pytest.raises(ValueError, match=r"freeze:block_99_.*match no parameter"):
    freezing.label_params(PARAMS, freezing.parse_rules(("freeze:block_99_.*", "train:.*")),
                          BASE)


def test_shadowed_rule_is_an_error():
  with pytest.raises(ValueError, match=r"train:predictions/\.\*"):
    freezing.label_params(
        PARAMS, freezing.parse_rules(("freeze:.*", "train:predictions/.*")), BASE)


@pytest.mark.parametrize("text", ["predictions/.*", "thaw:.*", "train:", "train:(unclosed"])
def test_malformed_rules(text):
  with pytest.raises(ValueError, match="freeze rule"):
    freezing.parse_rules((text,))


def test_presets_expand_and_unknown_preset_is_named():
  presets = MobileNetV2.PRESETS
  assert freezing.expand_presets(("preset:small_different",), presets) == (
      "freeze:layers[:block_11_expand_relu]", "train:.*")
  with pytest.raises(ValueError, match="'tiny'.*large_different"):
    freezing.expand_presets(("preset:tiny",), presets)
  for name in presets:  # Every preset covers every parameter.
    trained_paths(freezing.expand_presets((f"preset:{name}",), presets))


@pytest.mark.parametrize("by_name, by_index", [
    ("layers[:block_11_expand_relu]", "layers[:100]"),
    ("layers[:block_4_expand]", "layers[:36]"),
    ("layers[block_16_expand:Conv_1]", "layers[-11:-3]"),
    ("layers[Conv1]", "layers[1]")])
def test_layer_slices_by_name_equal_slices_by_index(by_name, by_index):
  assert trained_paths((f"train:{by_name}", "freeze:.*")) == \
      trained_paths((f"train:{by_index}", "freeze:.*"))


def test_layer_slice_naming_no_layer_lists_similar_names():
  with pytest.raises(ValueError, match=r"no layer 'block_11_expnd_relu'; layers with similar "
                     r"names: \['block_11_expand_relu'"):
    trained_paths(("freeze:layers[:block_11_expnd_relu]", "train:.*"))


def test_split_merge_round_trip():
  labels, _ = freezing.label_params(
      PARAMS, freezing.parse_rules(("freeze:layers[:100]", "train:.*")), BASE)
  train, frozen = freezing.split(PARAMS, labels)
  assert jax.tree.structure(freezing.merge(train, frozen)) == jax.tree.structure(PARAMS)
  assert "Conv1" in frozen and "Conv1" not in train


def test_report_table_counts():
  rules = freezing.parse_rules(("train:predictions/.*", "freeze:.*"))
  _, reports = freezing.label_params(PARAMS, rules, BASE)
  head = 1280 * 10 + 10
  assert reports[0].size == head and reports[0].arrays == 2
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(PARAMS))
  assert reports[1].size == total - head
  assert f"{head:,}" in freezing.format_report(reports)
