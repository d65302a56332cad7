"""Where a train step's time goes: XLA operation times by layer kind, operation and layer.

    python benchmarks/step_profile.py --phase full --size 160
    python benchmarks/step_profile.py --phase fine_tune --size 224 --out profile.json

Profiles the model's loss gradient for one of step_throughput.py's phase kinds, at batch
``--batch`` and ``--size``x``--size`` from the images: "frozen_base" (only the head trains,
BatchNorm in inference mode), "fine_tune" (``layers[:100]`` frozen, BatchNorm of the rest in
batch-statistics mode), "full" (every layer trains, BatchNorm in batch-statistics mode). The
optimizer update, under 1% of these steps, is left out. ``jax.profiler`` records each XLA
operation's time; the optimized HLO's metadata names the Keras layer an operation came from.
Prints three tables (by layer kind and operation, by operation, by layer) and writes JSON.
"""

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from timing import cpu_model, print_table, write_json  # noqa: E402
from tljax.models.mobilenet_v2 import MobileNetV2  # noqa: E402

FINE_TUNE_CUT = "block_11_expand_relu"  # layers[:100] of the base model.
RUNTIME_EVENTS = ("$", "ThunkExecutor", "Pjit", "Common", "Slinky", "Allocate", "end: ",
                  "Handle ", "Wait for", "ParseArguments")


def gradient_step(model, phase: str, batch: int, size: int):
  """``(step, args)``: the jitted gradient of the loss over the phase's trainable layers."""
  layers = model.layers
  names = [layer.name for layer in layers]
  cut = {"frozen_base": len(layers) - 1, "fine_tune": names.index(FINE_TUNE_CUT),
         "full": 0}[phase]
  train_bn = frozenset(l.name for l in layers[cut:] if l.kind == "bn")
  images = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3), minval=-1)
  labels = jnp.arange(batch) % model.num_classes
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  trainable = {k: v for k, v in variables["params"].items() if k in names[cut:]}
  frozen = {k: v for k, v in variables["params"].items() if k not in trainable}

  def loss(trainable, frozen, stats, images, labels):
    logits, _ = model.apply({"params": {**trainable, **frozen}, "batch_stats": stats}, images,
                            train_bn=train_bn, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return (jax.jit(jax.grad(loss)),
          (trainable, frozen, variables["batch_stats"], images, labels))


def operation_layers(hlo_text: str, layer_names: set[str]) -> dict[str, str]:
  """Operation name -> the Keras layer its ``op_name`` metadata names ("-" for none)."""
  where = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", line)
    if match:
      named = [part for part in re.split(r"[/()]", match.group(2)) if part in layer_names]
      where[match.group(1)] = named[-1] if named else "-"
  return where


def traced_times(step, args, calls: int) -> dict[str, float]:
  """Milliseconds per call of each XLA operation, from a ``jax.profiler`` trace."""
  jax.block_until_ready(step(*args))
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(step(*args))
    [path] = pathlib.Path(directory).rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
  events = events["traceEvents"] if isinstance(events, dict) else events
  times = collections.defaultdict(float)
  for event in events:
    if event.get("ph") == "X" and "dur" in event and not event["name"].startswith(
        RUNTIME_EVENTS):
      times[event["name"]] += event["dur"] / calls / 1e3
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--phase", default="full", choices=("frozen_base", "fine_tune", "full"))
  parser.add_argument("--size", type=int, default=160)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--calls", type=int, default=3, help="traced steps")
  parser.add_argument("--top", type=int, default=20, help="rows per table")
  parser.add_argument("--out", default="step_profile.json")
  args = parser.parse_args()

  model = MobileNetV2(alpha=1.0, include_top=True, num_classes=10)
  kinds = {layer.name: layer.kind for layer in model.layers}
  step, step_args = gradient_step(model, args.phase, args.batch, args.size)
  where = operation_layers(step.lower(*step_args).compile().as_text(), set(kinds))
  times = traced_times(step, step_args, args.calls)
  total = sum(times.values())
  groups = {"kind_operation": collections.defaultdict(float),
            "operation": collections.defaultdict(float), "layer": collections.defaultdict(float)}
  for name, ms in times.items():
    layer = where.get(name, "-")
    operation = re.sub(r"[._]?\d+$", "", name)
    groups["kind_operation"][f"{kinds.get(layer, '-')} / {operation}"] += ms
    groups["operation"][operation] += ms
    groups["layer"][layer] += ms
  device = (cpu_model() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind)
  print(f"{args.phase}, batch {args.batch}, {args.size}x{args.size}: {total:.1f} ms of XLA "
        f"operations a step; {device}")
  tables = {}
  for group, sums in groups.items():
    rows = [{"part": part, "ms": ms, "share": 100 * ms / total}
            for part, ms in sorted(sums.items(), key=lambda item: -item[1])]
    tables[group] = rows
    print(f"\nby {group.replace('_', ' and ')}")
    print_table(rows[:args.top], [("part", "part", ""), ("ms", "ms", ".1f"),
                                  ("%", "share", ".1f")])
  write_json(args.out, {"phase": args.phase, "batch": args.batch, "size": args.size,
                        "total_ms": total, "device": device, **tables})


if __name__ == "__main__":
  main()
