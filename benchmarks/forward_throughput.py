"""Forward-pass throughput of MobileNetV2 (inference mode), shifted vs XLA depthwise.

    python benchmarks/forward_throughput.py --sizes 32,224 --batch 32 --out forward.json

Both implementations run in this process, alternating, so their ratio is measured side by
side on the same (possibly noisy) machine. Prints a table and writes JSON.
"""

import argparse
import json
import statistics
import time

import jax

from tljax.models.mobilenet_v2 import MobileNetV2

IMPLS = ("shifted", "xla")


def make_forward(impl: str, alpha: float, size: int, batch: int):
  model = MobileNetV2(alpha=alpha, include_top=True, num_classes=1000, depthwise=impl)
  x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])
  forward = jax.jit(lambda v, x: model.apply(v, x))
  start = time.perf_counter()
  jax.block_until_ready(forward(variables, x))
  return (lambda: jax.block_until_ready(forward(variables, x))), time.perf_counter() - start


def time_call(fn, min_seconds: float) -> list[float]:
  times, start = [], time.perf_counter()
  while time.perf_counter() - start < min_seconds or len(times) < 5:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="32,224", help="comma-separated square input sizes")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
  parser.add_argument("--seconds", type=float, default=2.0, help="per round and impl")
  parser.add_argument("--out", default="forward_throughput.json")
  args = parser.parse_args()
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    fns, compile_s = {}, {}
    for impl in IMPLS:
      fns[impl], compile_s[impl] = make_forward(impl, args.alpha, size, args.batch)
    times = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
      for impl in IMPLS:
        times[impl] += time_call(fns[impl], args.seconds)
    for impl in IMPLS:
      median = statistics.median(times[impl])
      rows.append({"size": size, "batch": args.batch, "alpha": args.alpha, "depthwise": impl,
                   "compile_s": compile_s[impl], "median_ms": median * 1e3,
                   "images_per_s": args.batch / median, "calls": len(times[impl])})
  base = {r["size"]: r["images_per_s"] for r in rows if r["depthwise"] == "xla"}
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"{'size':>5} {'depthwise':>9} {'median ms':>10} {'images/s':>10} {'vs xla':>7}")
  for r in rows:
    r["speedup_vs_xla"] = r["images_per_s"] / base[r["size"]]
    print(f"{r['size']:>5} {r['depthwise']:>9} {r['median_ms']:>10.1f} "
          f"{r['images_per_s']:>10.0f} {r['speedup_vs_xla']:>6.1f}x")
  with open(args.out, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
