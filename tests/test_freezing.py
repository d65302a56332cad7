"""Freeze rules -> labels -> masked optimizer: the parameter-masking guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from tljax import freezing, steps
from tljax.models.mobilenet_v2 import MobileNetV2

MODEL = MobileNetV2(alpha=0.35, include_top=True, num_classes=10)
BASE = MODEL.base_layers
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


# --- Training with masks: frozen parameters and statistics never move. ----------------------

PHASES = {
    "frozen_base": (("train:predictions/.*", "freeze:.*"), "inference"),
    "fine_tune_batch_stats": (("freeze:layers[:100]", "train:.*"), "batch_stats"),
    "fine_tune_inference": (("freeze:layers[:100]", "train:.*"), "inference"),
}


def _calibrated_variables():
  """Random weights with moving statistics set from one batch, so that inference-mode
  activations neither vanish nor saturate (and every trainable parameter gets a gradient)."""
  x = np.random.default_rng(1).uniform(0, 1, (16, 32, 32, 3)).astype(np.float32)
  variables = MODEL.init(jax.random.PRNGKey(0), x)
  bn = [l for l in MODEL.layers if l.kind == "bn"]
  pre_bn, _ = MODEL.apply(variables, x, train_bn=frozenset(l.name for l in bn),
                          capture=[l.inputs[0] for l in bn], mutable=["batch_stats"])
  stats = {l.name: {"mean": jnp.mean(pre_bn[l.inputs[0]], (0, 1, 2)),
                    "var": jnp.var(pre_bn[l.inputs[0]], (0, 1, 2))} for l in bn}
  return {"params": variables["params"], "batch_stats": stats}


CALIBRATED = _calibrated_variables()


def _train(rules, batchnorm, tx, num_steps=3):
  variables = CALIBRATED
  labels, _ = freezing.label_params(variables["params"], freezing.parse_rules(rules), BASE)
  bn = {l.name for l in MODEL.layers if l.kind == "bn"}
  train_bn = frozenset(freezing.trainable_layers(labels) & bn) if batchnorm == "batch_stats" \
      else frozenset()
  masked = freezing.masked_optimizer(tx, labels)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=masked.init(variables["params"]),
                           rng=jax.random.PRNGKey(1), bad_steps=jnp.zeros((), jnp.int32))
  step = jax.jit(lambda s, x, y: steps.train_step(s, x, y, model=MODEL, tx=masked,
                                                   param_labels=labels, train_bn=train_bn))
  rng = np.random.default_rng(0)
  for _ in range(num_steps):
    x = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    state, _ = step(state, x, y)
  return variables, labels, train_bn, state


@pytest.fixture(scope="module", params=list(PHASES))
def trained(request):
  rules, batchnorm = PHASES[request.param]
  return (request.param, batchnorm) + _train(rules, batchnorm, optax.adam(1e-3))


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_frozen_params_bit_identical_and_trainable_changed(trained):
  _, _, before, labels, _, state = trained
  flat_labels = _flat(labels)
  after = _flat(state.params)
  for path, value in _flat(before["params"]).items():
    same = np.array_equal(np.asarray(value), np.asarray(after[path]))
    if flat_labels[path] == "freeze":
      assert same and np.asarray(value).tobytes() == np.asarray(after[path]).tobytes(), path
    else:
      assert not same, f"trainable {path} did not change"


def test_batch_stats_move_only_in_batch_stats_mode(trained):
  _, batchnorm, before, _, train_bn, state = trained
  for name, stats in before["batch_stats"].items():
    for key in ("mean", "var"):
      same = np.array_equal(np.asarray(stats[key]), np.asarray(state.batch_stats[name][key]))
      if name in train_bn:
        assert not same, f"{name}/{key} should have been updated"
      else:
        assert same, f"{name}/{key} changed although {name} is frozen or in inference mode"
  assert bool(train_bn) == (batchnorm == "batch_stats")


def test_optimizer_state_has_no_moments_for_frozen_params(trained):
  _, _, before, labels, _, state = trained
  trainable = sum(1 for l in jax.tree.leaves(labels) if l == "train")
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
  assert len(moments) == 2 * trainable  # Adam's mu and nu, trainable leaves only.
  train_size = sum(int(np.prod(v.shape)) for p, v in _flat(before["params"]).items()
                   if _flat(labels)[p] == "train")
  assert sum(int(np.prod(m.shape)) for m in moments) == 2 * train_size


def test_adamw_decay_leaves_frozen_params_untouched():
  before, labels, _, state = _train(("train:predictions/.*", "freeze:.*"), "inference",
                                    optax.adamw(1e-3, weight_decay=0.5), num_steps=2)
  after = _flat(state.params)
  for path, label in _flat(labels).items():
    if label == "freeze":
      assert np.array_equal(np.asarray(_flat(before["params"])[path]), np.asarray(after[path]))


def test_non_finite_step_is_skipped():
  variables = CALIBRATED
  labels, _ = freezing.label_params(
      variables["params"], freezing.parse_rules(("train:Conv_1.*|predictions/.*", "freeze:.*")),
      BASE)
  tx = freezing.masked_optimizer(optax.adam(1e-3), labels)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(0),
                           bad_steps=jnp.zeros((), jnp.int32))
  x = np.full((4, 32, 32, 3), np.nan, np.float32)
  new, metrics = jax.jit(lambda s, x, y: steps.train_step(
      s, x, y, model=MODEL, tx=tx, param_labels=labels,
      train_bn=frozenset({"Conv_1_bn"})))(state, x, np.zeros(4, np.int32))
  assert not bool(metrics["finite"]) and int(new.bad_steps) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                  jax.tree.leaves((new.params, new.batch_stats, new.opt_state))):
    assert np.array_equal(np.asarray(a), np.asarray(b))
