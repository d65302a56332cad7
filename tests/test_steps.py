"""The pure train step with freeze labels: frozen parameters and BatchNorm statistics never
move and hold no optimizer state; a non-finite step is skipped."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from helpers import BASE, MODEL, calibrated
from tljax import freezing, prefix, steps
from tljax.models import microbatch

PHASES = {
    "frozen_base": (("train:predictions/.*", "freeze:.*"), "inference"),
    "fine_tune_batch_stats": (("freeze:layers[:100]", "train:.*"), "batch_stats"),
    "fine_tune_inference": (("freeze:layers[:100]", "train:.*"), "inference"),
}


@functools.cache
def calibrated_variables():
  """Random weights with moving statistics set from one batch, so that inference-mode
  activations neither vanish nor saturate (and every trainable parameter gets a gradient).
  Made on first use and compiled as one program: pytest imports this file in every worker."""
  x = np.random.default_rng(1).uniform(0, 1, (16, 32, 32, 3)).astype(np.float32)
  return jax.jit(lambda x: calibrated(MODEL, MODEL.init(jax.random.PRNGKey(0), x), x))(x)


def _train(rules, batchnorm, tx, num_steps=3, micro_batches=True):
  """``num_steps`` steps as the trainer takes them: in micro-batches of 2 images (the frozen
  layers, and the gradient where BatchNorm keeps its moving statistics), unless
  ``micro_batches`` is false."""
  variables = calibrated_variables()
  labels, _ = freezing.label_params(variables["params"], freezing.parse_rules(rules), BASE)
  bn = {l.name for l in MODEL.layers if l.kind == "bn"}
  train_bn = frozenset(freezing.trainable_layers(labels) & bn) if batchnorm == "batch_stats" \
      else frozenset()
  frozen_until = (prefix.first_trainable_layer(MODEL.layers, freezing.trainable_layers(labels))
                  if micro_batches else 0)
  masked = freezing.masked_optimizer(tx, labels)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=masked.init(variables["params"]),
                           rng=jax.random.PRNGKey(1), bad_steps=jnp.zeros((), jnp.int32))
  step = jax.jit(lambda s, x, y: steps.train_step(s, x, y, model=MODEL, tx=masked,
                                                   param_labels=labels, train_bn=train_bn,
                                                   frozen_until=frozen_until, image_size=32))
  rng = np.random.default_rng(0)
  pixels = 2 * 32 * 32 if micro_batches else microbatch.PIXELS  # The batch of 8 at once.
  with mock.patch.object(microbatch, "PIXELS", pixels):  # Read when the step compiles.
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


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="micro-batches are the CPU's path: "
                    "elsewhere microbatch.size is the whole batch, so both runs would take "
                    "the same whole-batch step and the comparison could not fail")
def test_frozen_layers_in_micro_batches_train_as_the_whole_batch():
  # SGD: its update is linear in the gradient (Adam's turns rounding noise in near-zero
  # gradients into steps as large as its learning rate).
  (_, _, _, micro), (_, _, _, whole) = (
      _train(*PHASES["fine_tune_inference"], optax.sgd(0.01), num_steps=1, micro_batches=m)
      for m in (True, False))
  # The same operations on fewer rows, in float32: XLA:CPU may block the matrix products
  # differently (measured: 1.3e-6 apart at most). A row out of place moves them far more.
  for a, b in zip(jax.tree.leaves((micro.params, micro.batch_stats)),
                  jax.tree.leaves((whole.params, whole.batch_stats))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_adamw_decay_leaves_frozen_params_untouched():
  before, labels, _, state = _train(("train:predictions/.*", "freeze:.*"), "inference",
                                    optax.adamw(1e-3, weight_decay=0.5), num_steps=2)
  after = _flat(state.params)
  for path, label in _flat(labels).items():
    if label == "freeze":
      assert np.array_equal(np.asarray(_flat(before["params"])[path]), np.asarray(after[path]))


def test_non_finite_step_is_skipped():
  variables = calibrated_variables()
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


def test_bad_steps_stop_the_run_when_they_reach_max_bad_steps():
  steps.check_bad_steps(9, 10, "p", 20)
  with pytest.raises(steps.NonFiniteError, match=r"phase p: steps 11\.\.20 of the phase all had "
                     r"a non-finite loss or gradient \(max_bad_steps=10\)"):
    steps.check_bad_steps(10, 10, "p", 20)


# ---------------------------------------------------------------- class weights


def test_balanced_class_weights_are_inverse_frequencies_with_mean_one_over_examples():
  labels = np.array([0] * 6 + [1] * 3 + [2] * 1 + [0] * 2)  # 8, 3, 1 of 4 classes (3: none)
  weights = steps.balanced_class_weights(labels, 4)
  np.testing.assert_allclose(weights, [12 / 24, 12 / 9, 12 / 3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(weights[labels].mean(), 1.0, rtol=1e-6)
  assert steps.loss_class_weights("none", labels, 4) is None
  with pytest.raises(ValueError, match="class_weighting='inverse' is not one of"):
    steps.loss_class_weights("inverse", labels, 4)


def test_class_weights_weigh_each_examples_loss_by_its_class():
  """The step's loss is sum(w[y] * cross-entropy) / batch: checked against logits computed
  by hand from the head's inputs, for the weights and for none (which differ, so the check
  can fail). The step starts at the head, on pooled features, as a cached head phase does."""
  variables = calibrated_variables()
  rules = freezing.parse_rules(PHASES["frozen_base"][0])
  labels_tree, _ = freezing.label_params(variables["params"], rules, BASE)
  masked = freezing.masked_optimizer(optax.sgd(0.0), labels_tree)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=masked.init(variables["params"]),
                           rng=jax.random.PRNGKey(1), bad_steps=jnp.zeros((), jnp.int32))
  head = [layer.name for layer in MODEL.layers].index("predictions")
  (pooled,) = prefix.frontier(MODEL.layers, head)
  features = np.random.default_rng(3).normal(size=(8, 1280)).astype(np.float32)
  y = np.array([0, 0, 0, 0, 0, 1, 1, 2])
  weights = steps.balanced_class_weights(y, 10)
  step = jax.jit(lambda w: steps.train_step(state, {pooled: features}, y, model=MODEL,
                                           tx=masked, param_labels=labels_tree,
                                           train_bn=frozenset(), start=head,
                                           class_weights=w)[1]["loss"])
  kernel, bias = (np.asarray(variables["params"]["predictions"][k], np.float64)
                  for k in ("kernel", "bias"))
  logits = features @ kernel + bias
  per_example = (np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
                 + logits.max(1) - logits[np.arange(8), y])
  np.testing.assert_allclose(step(weights), np.sum(weights[y] * per_example) / 8, rtol=1e-5)
  np.testing.assert_allclose(step(np.ones(10, np.float32)), per_example.mean(), rtol=1e-5)
  assert abs(float(step(weights)) - per_example.mean()) > 1e-2 * per_example.mean()
