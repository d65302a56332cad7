"""Data parallelism: 8 forced CPU devices compute what 1 device computes."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

from helpers import with_devices
from tljax import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh process: the device count is fixed when JAX starts.
EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from configs import default
    from tljax import dispatch, models, phases, sharding
    from tljax.data import transforms
    from tljax.models.batch_norm import BatchNorm
    assert jax.device_count() == 8, jax.devices()
    config = default.get_config()
    config.model.alpha = 0.35
    config.batch_size = 16
    config.data.scale = "symmetric"
    config.phases[1].cache_prefix = "off"
    # The last convolution and the head: cheap to compile on one and on eight devices.
    config.phases[1].rules = ("freeze:layers[:151]", "train:.*")
    # SGD: its update is linear in the gradient. (Adam divides by sqrt(v) + eps and turns
    # the reduction-order noise of near-zero gradients into differences as large as lr.)
    config.phases[1].optimizer = "sgd"
    config.phases[1].learning_rate = 0.01
    model = models.create(config.model, 10)
    init = jax.jit(model.init)  # One program, not hundreds of eager initialisers.
    variables = jax.device_get(init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    indices = rng.permutation(64)[:48].reshape(3, 16).astype(np.int32)
    bn = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
    bn_variables = bn.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.data_mesh(devices)
      model = models.create(config.model, 10, batch_shards=len(devices))
      phase = phases.build_phase(config, 1, model, variables["params"], 64)
      state = jax.jit(lambda v: phases.init_state(phase, v, 0),
                      out_shardings=sharding.replicated(mesh))(variables)
      chunk = dispatch.make_train_chunk(phase, model, 0, transforms.EvalView.from_config(config))
      inputs = jax.device_put({"images": images}, sharding.replicated(mesh))
      state, metrics = chunk(state, inputs, jax.device_put(labels, sharding.replicated(mesh)),
                             jax.device_put(indices, sharding.batch_sharded(mesh, 1)))
      # Batch-statistics mode normalises with, and averages in, the GLOBAL batch's moments.
      x = jax.device_put(np.asarray(jax.random.normal(jax.random.PRNGKey(2), (16, 4, 4, 8))),
                         sharding.batch_sharded(mesh))
      updated = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(bn_variables, x)
      results.append(jax.device_get((state.params, metrics["loss"], updated)))
    (p1, l1, s1), (p8, l8, s8) = results
    def worst(a, b):
      return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b)))
    print("LOSSES", l1, l8, "PARAMS", worst(p1, p8), "STATS", worst(s1, s8))
    # Float32 sums in another order on 8 devices: 1e-5 absolute after 3 SGD steps at lr 0.01,
    # and for moving statistics of order 1.
    assert np.allclose(l1, l8, rtol=1e-5, atol=1e-5), (l1, l8)
    assert worst(p1, p8) < 1e-5 and worst(s1, s8) < 1e-5
    assert worst(p1, variables["params"]) > 1e-4  # The step did train.
    print("OK")
""")


def test_eight_devices_match_one_device():
  env = with_devices(dict(os.environ, PYTHONPATH=str(ROOT)), 8)
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


def test_batch_size_must_divide_device_count():
  mesh = sharding.data_mesh(jax.devices()[:1] * 1)
  sharding.check_batch_size(32, mesh)
  with pytest.raises(ValueError, match=r"batch_size=0 must be a positive multiple"):
    sharding.check_batch_size(0, mesh)
