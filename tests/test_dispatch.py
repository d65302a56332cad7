"""The compiled train chunk: its fast paths compute what the plain path computes (the cached
frozen prefix, scanned head steps, bfloat16)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
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
  phase = phase.__class__(**{**phase.__dict__, "cut": cut})
  assert dispatch.scans_steps(phase, model) == (model.layers[cut].kind == "dense")
  state = phases.init_state(phase, jax.tree.map(jnp.array, variables), config.seed)
  chunk = dispatch.make_train_chunk(phase, model, transforms.EvalView.from_config(config))
  state, metrics = chunk(state, inputs, jnp.asarray(labels), jnp.asarray(indices))
  return jax.device_get((state.params, state.batch_stats, metrics["loss"]))


def test_cached_prefix_phase_equals_uncached():
  config, model, variables, images, labels, indices = _setup()
  phase = phases.build_phase(config, 1, model, variables["params"], len(labels))
  assert model.layers[phase.cut].name == "block_11_depthwise"  # layers[:100] + its relu.
  device_images = {"images": jnp.asarray(images)}
  source = sources.DeviceSource(device_images, jnp.asarray(labels), MESH)
  cache, = prefix.build_prefix_caches(variables, source, model=model, cuts=(phase.cut,),
                                      view=transforms.EvalView.from_config(config),
                                      batch_size=config.eval_batch_size, mesh=MESH)
  assert set(cache) == {"block_10_project_BN", "block_11_expand_relu"}
  cached = _run_chunk(config, model, variables, cache, labels, indices, phase.cut)
  plain = _run_chunk(config, model, variables, device_images, labels, indices, 0)
  np.testing.assert_allclose(cached[2], plain[2], rtol=1e-5)
  # Float32: the same arithmetic, fused differently by XLA. 3 Adam steps at lr 1e-3.
  for a, b in zip(jax.tree.leaves(cached[:2]), jax.tree.leaves(plain[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scanned_head_steps_equal_separate_steps():
  # The cached frozen-base phase runs only the head: its steps run as one lax.scan.
  config, model, variables, images, labels, indices = _setup()
  phase = phases.build_phase(config, 0, model, variables["params"], len(labels))
  assert model.layers[phase.cut].name == "predictions"
  device_images = {"images": jnp.asarray(images)}
  source = sources.DeviceSource(device_images, jnp.asarray(labels), MESH)
  cache, = prefix.build_prefix_caches(variables, source, model=model, cuts=(phase.cut,),
                                      view=transforms.EvalView.from_config(config),
                                      batch_size=config.eval_batch_size, mesh=MESH)
  scanned = _run_chunk(config, model, variables, cache, labels, indices, phase.cut, index=0)
  plain = _run_chunk(config, model, variables, device_images, labels, indices, 0, index=0)
  np.testing.assert_allclose(scanned[2], plain[2], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(scanned[:2]), jax.tree.leaves(plain[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_step_stays_close_to_float32():
  results = []
  for dtype in ("float32", "bfloat16"):
    config, model, variables, images, labels, indices = _setup(dtype=dtype)
    results.append(_run_chunk(config, model, variables, {"images": jnp.asarray(images)},
                              labels, indices[:1], 0))
  (p32, _, loss32), (p16, _, loss16) = results
  # bfloat16 keeps 8 bits of mantissa: the loss agrees to ~1%, and one Adam step at lr 1e-3
  # moves every parameter by at most ~lr in either precision.
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=2.5e-3)
