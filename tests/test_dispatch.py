"""The compiled train chunk: its fast paths compute what the plain path computes (the cached
frozen prefix, scanned head steps, bfloat16)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from helpers import calibrated
from tljax import dispatch, models, phases, prefix, sharding
from tljax.data import sources, transforms

MESH = sharding.data_mesh(jax.devices()[:1])


@functools.cache
def _initial_variables(model):
  return jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


def _setup(**model_overrides):
  config = default.get_config()
  config.model.alpha = 0.35
  config.batch_size = 16
  config.eval_batch_size = 32
  config.phases[1].batchnorm = "batch_stats"
  config.phases[1].learning_rate = 1e-3
  config.model.update(model_overrides)
  model = models.create(config.model, 10)
  variables = _initial_variables(model.clone(dtype=jnp.float32))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (64, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  indices = rng.permutation(64)[:48].reshape(3, 16).astype(np.int32)
  return config, model, variables, images, labels, indices


def _run_chunk(config, model, variables, inputs, labels, indices, cut, index=1):
  phase = phases.build_phase(config, index, model, variables["params"], len(labels))
  assert dispatch.scans_steps(model, cut) == (model.layers[cut].kind == "dense")
  state = phases.init_state(phase, jax.tree.map(jnp.array, variables), config.seed)
  chunk = dispatch.make_train_chunk(phase, model, cut, transforms.EvalView.from_config(config))
  state, metrics = chunk(state, inputs, jnp.asarray(labels), jnp.asarray(indices))
  return jax.device_get((state.params, state.batch_stats, metrics["loss"]))


def _cache(config, model, variables, images, labels, cut):
  """The cache of ``layers[:cut]`` over ``images``, as the trainer builds it."""
  source = sources.DeviceSource({"images": jnp.asarray(images)}, jnp.asarray(labels), MESH)
  cache, = prefix.build_prefix_caches(variables, source, model=model, cuts=(cut,),
                                      view=transforms.EvalView.from_config(config),
                                      batch_size=config.eval_batch_size, mesh=MESH)
  return cache


def test_cached_prefix_phase_equals_uncached():
  config, model, variables, images, labels, indices = _setup()
  # A cut inside a residual block, as the recipe's layers[:100] is, nearer the top: cheaper
  # to compile.
  config.phases[1].rules = ("freeze:layers[:136]", "train:.*")
  cut = phases.build_phase(config, 1, model, variables["params"], len(labels)).cacheable_cut
  assert model.layers[cut].name == "block_15_depthwise"  # layers[:136] + its relu.
  cache = _cache(config, model, variables, images, labels, cut)
  assert set(cache) == {"block_14_add", "block_15_expand_relu"}  # The skip and the branch.
  cached = _run_chunk(config, model, variables, cache, labels, indices, cut)
  plain = _run_chunk(config, model, variables, {"images": jnp.asarray(images)}, labels,
                     indices, 0)
  np.testing.assert_allclose(cached[2], plain[2], rtol=1e-5)
  # Float32: the same arithmetic, fused differently by XLA. 3 Adam steps at lr 1e-3.
  for a, b in zip(jax.tree.leaves(cached[:2]), jax.tree.leaves(plain[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scanned_head_steps_equal_separate_steps():
  # The cached frozen-base phase runs only the head: its steps run as one lax.scan.
  config, model, variables, images, labels, indices = _setup()
  cut = phases.build_phase(config, 0, model, variables["params"], len(labels)).cacheable_cut
  assert model.layers[cut].name == "predictions"
  cache = _cache(config, model, variables, images, labels, cut)
  scanned = _run_chunk(config, model, variables, cache, labels, indices, cut, index=0)
  plain = _run_chunk(config, model, variables, {"images": jnp.asarray(images)}, labels,
                     indices, 0, index=0)
  np.testing.assert_allclose(scanned[2], plain[2], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(scanned[:2]), jax.tree.leaves(plain[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_step_updates_the_weights_as_float32_does():
  # Conv_1 and the head train, from a float32 cache of the layers below: a deeper network
  # amplifies bfloat16's rounding (8 bits of mantissa) until its gradient is tens of percent
  # from float32's, whatever the step does right. SGD: the update is -lr * the gradient, at
  # a learning rate where it is small beside the weights, so that applying it in bfloat16
  # would round it away.
  results = []
  for dtype in ("float32", "bfloat16"):
    config, model, variables, images, labels, indices = _setup(dtype=dtype)
    config.phases[1].update(rules=("freeze:layers[:151]", "train:.*"), batchnorm="inference",
                            optimizer="sgd", learning_rate=0.01)
    view = transforms.EvalView.from_config(config)
    variables = jax.device_get(calibrated(model.clone(dtype=jnp.float32), variables,
                                          view(jnp.asarray(images))))
    cut = phases.build_phase(config, 1, model, variables["params"], len(labels)).cacheable_cut
    assert model.layers[cut].name == "Conv_1"
    if dtype == "float32":  # Both read the float32 cache.
      cache = _cache(config, model, variables, images, labels, cut)
    params, _, loss = _run_chunk(config, model, variables, cache, labels, indices[:1], cut)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    results.append((jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, params,
                                 variables["params"]), loss))
  (update32, loss32), (update16, loss16) = results
  # Measured on the CPU: the losses 6e-4 apart, the updates 0.046 of the update's size apart;
  # 0.11 with the gradient 10% too large, 0.24 with the update applied in bfloat16.
  np.testing.assert_allclose(loss16, loss32, rtol=3e-3)
  difference = np.sqrt(sum(np.sum((a - b)**2) for a, b in zip(jax.tree.leaves(update16),
                                                               jax.tree.leaves(update32))))
  size = np.sqrt(sum(np.sum(b**2) for b in jax.tree.leaves(update32)))
  assert difference < 0.07 * size, difference / size
