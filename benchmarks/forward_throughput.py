"""Forward-pass throughput of MobileNetV2 (inference mode), shifted vs XLA depthwise.

    python benchmarks/forward_throughput.py --sizes 32,224 --batch 32 --out forward.json

Both implementations run in this process, alternating, so their ratio is measured side by
side on the same (possibly noisy) machine. Prints a table and writes JSON.
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # This checkout's tljax.

import jax  # noqa: E402

from timing import cpu_model, print_table, summarize, time_calls, write_json  # noqa: E402
from tljax.models.mobilenet_v2 import MobileNetV2  # noqa: E402

IMPLS = ("shifted", "xla")


def make_forward(impl: str, alpha: float, size: int, batch: int):
  model = MobileNetV2(alpha=alpha, include_top=True, num_classes=1000, depthwise=impl)
  x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])
  forward = jax.jit(lambda v, x: model.apply(v, x))
  start = time.perf_counter()
  jax.block_until_ready(forward(variables, x))
  return (lambda: jax.block_until_ready(forward(variables, x))), time.perf_counter() - start


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
        times[impl] += time_calls(fns[impl], args.seconds, min_calls=5)
    for impl in IMPLS:
      rows.append({"size": size, "batch": args.batch, "alpha": args.alpha, "depthwise": impl,
                   "compile_s": compile_s[impl], **summarize(times[impl], args.batch)})
  base = {r["size"]: r["images_per_s"] for r in rows if r["depthwise"] == "xla"}
  for r in rows:
    r["speedup_vs_xla"] = r["images_per_s"] / base[r["size"]]
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, host CPU {cpu_model()}")
  print_table(rows, [("size", "size", "d"), ("depthwise", "depthwise", ""),
                     ("median ms", "median_ms", ".1f"), ("images/s", "images_per_s", ".0f"),
                     ("vs xla", "speedup_vs_xla", ".1f")])
  write_json(args.out, {"device": str(jax.devices()[0]), "cpu": cpu_model(),
                        "date": time.strftime("%Y-%m-%d"), "rows": rows})


if __name__ == "__main__":
  main()
