"""What XLA says a compiled function costs, and the machine's float32 matmul rate to hold
achieved FLOP/s against; for the benchmark scripts that run jax."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def flops(compiled: jax.stages.Compiled) -> float:
  """The FLOPs of XLA's cost analysis; it counts a loop's body once."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0))


def memory_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Temporaries, and the peak: arguments, outputs not aliased to them, and temporaries."""
  memory = compiled.memory_analysis()
  return {"temp_bytes": memory.temp_size_in_bytes,
          "peak_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         - memory.alias_size_in_bytes + memory.temp_size_in_bytes)}


def make_matmul() -> tuple[Callable[[], jax.Array], int]:
  """A warmed-up call of a jitted float32 square matrix product (default precision), the
  machine's ceiling, and its FLOPs."""
  n = 2048 if jax.default_backend() == "cpu" else 8192  # Large enough to fill an accelerator.
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  matmul = jax.jit(jnp.dot)
  call = lambda: jax.block_until_ready(matmul(a, a))
  call()
  return call, 2 * n**3
