"""Train-step throughput of tljax's compiled train step, by phase kind, batch and input size.

    python benchmarks/step_throughput.py --out step_throughput.json
    python benchmarks/step_throughput.py --batch_sizes 32,128,512 --sizes 32,224 --extra ""
    python benchmarks/step_throughput.py --baselines keras_jax,keras_tf

Each case runs the trainer's own train chunk (``tljax.dispatch.make_train_chunk``, K steps per
call) for a phase built by ``tljax.phases.build_phase`` from ``configs/mnist_mnv2.py``:
"frozen_base" is its phases[0] (only the head trains), "fine_tune" its phases[1]
(``layers[:100]`` frozen, BatchNorm in batch-statistics mode), "full" phases[1] with every
parameter trainable. The step reads random uint8 MNIST-shaped images (28x28) and resizes them
to the input size, as in training ("uncached"), or reads the frozen prefix's cached output
("cached"), as the trainer does by default where the prefix is frozen and the cache of MNIST's
60,000 images fits ``cache_max_gb``. Weights are random: the step's cost does not depend on
their values.

Per case: compile time, median and p90 step time, training images/s, the step's FLOPs from
XLA's cost analysis, achieved GFLOP/s and its fraction of a large float32 matmul timed in the
same rounds, and the compiled step's memory. Levers, at the first batch size and input size:
gradients of every parameter then the same masked optimizer (instead of the trainable
partition only), the other depthwise implementation, and bfloat16 on accelerators.
Baselines: the same model and trainable set in Keras 3 (``train_on_batch``, Adam), each in its
own process running ``keras_worker.py`` (tf.keras with ``--tf_python``, which needs TensorFlow
only). All cases of one batch size and input size, baselines included, are timed in
alternating rounds, so their ratios are measured side by side on a possibly busy machine.
Prints tables and writes JSON.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's tljax, and configs as the package ``configs``.
# The baselines' processes share the accelerator: this one takes memory as it needs it instead
# of most of it up front (on a GPU, a Keras full fine-tune at batch 128, 224x224 ran out).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_worker import KINDS as BASELINES, Worker, WorkerError  # noqa: E402
from timing import cpu_model, print_table, summarize, time_calls, write_json  # noqa: E402
from tljax import dispatch, freezing, models  # noqa: E402
from tljax import phases, prefix, sharding  # noqa: E402
from tljax.data import sources, transforms  # noqa: E402
from tljax.models import depthwise, microbatch  # noqa: E402

# Phase kind -> (index into config.phases, rules replacing that phase's, or None).
PHASES = {"frozen_base": (0, None), "fine_tune": (1, None), "full": (1, ("train:.*",))}
MNIST_SHAPE = (28, 28)
MNIST_EXAMPLES = 60_000    # Train + validation images the trainer would cache.
NUM_CLASSES = 10
MATMUL_SIZE = {"cpu": 2048}   # By backend; 8192 elsewhere, to fill an accelerator.


# ---------------------------------------------------------------------------------------------
# tljax cases.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One compiled step to time."""
  phase: str                    # A key of PHASES.
  cached: bool                  # Step from the cached frozen prefix instead of the images.
  batch: int
  size: int
  grad: str = "partial"         # partial (the trainer's) | everything (then masked).
  depthwise: str = "auto"       # config.model.depthwise.
  dtype: str = "float32"        # config.model.dtype (compute dtype).
  microbatch: bool = True       # Frozen layers in micro-batches (the trainer's) or whole.

  @property
  def is_lever(self) -> bool:
    return (self.grad != "partial" or self.depthwise != "auto" or self.dtype != "float32"
            or not self.microbatch)

  @property
  def label(self) -> str:
    return (f"{self.phase} {'cached' if self.cached else 'uncached'}"
            + ("" if self.grad == "partial" else " grad-everything")
            + ("" if self.depthwise == "auto" else f" dw-{self.depthwise}")
            + ("" if self.dtype == "float32" else f" {self.dtype}")
            + ("" if self.microbatch else " whole-batch"))


def parse_case(text: str) -> Case:
  """``"phase:cached|uncached:batch:size"``, e.g. ``"fine_tune:cached:128:32"``."""
  parts = text.split(":")
  if len(parts) != 4 or parts[0] not in PHASES or parts[1] not in ("cached", "uncached"):
    raise ValueError(f"--extra case {text!r} is not 'phase:cached|uncached:batch:size' with "
                     f"phase in {list(PHASES)}, e.g. 'fine_tune:cached:128:32'.")
  return Case(parts[0], parts[1] == "cached", int(parts[2]), int(parts[3]))


def load_config(path: str, case: Case, steps_per_dispatch: int):
  """The config at ``path`` set up for ``case``; also the index of its phase."""
  spec = importlib.util.spec_from_file_location("step_throughput_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  index, rules = PHASES[case.phase]
  config.batch_size = case.batch
  config.steps_per_dispatch = steps_per_dispatch
  config.model.input_size = case.size
  config.model.depthwise = case.depthwise
  config.model.dtype = case.dtype
  config.data.augment_shift = 0
  if rules is not None:
    config.phases[index].rules = rules
  return config, index


def random_variables(model, size: int, seed: int) -> dict[str, Any]:
  """He-normal kernels and unit BatchNorm, made on the host (``model.init`` compiles slowly)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(s.shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(s.shape, np.float32)
    fan_in = np.prod(s.shape[:2]) if name == "depthwise_kernel" else np.prod(s.shape[:-1])
    return (rng.standard_normal(s.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def steps_per_dispatch_for(batch: int, size: int, requested: int) -> int:
  """``requested``, or (0) about 128 32x32-image-equivalents per dispatch, at least 1."""
  return requested or max(1, round(128 / batch * (32 / size) ** 2))


def cache_fits(model, cut: int, variables, config) -> bool:
  """Whether the trainer would cache ``layers[:cut]`` for all of MNIST (``cache_max_gb``)."""
  per_example = prefix.bytes_per_example(model, cut, variables, config.model.input_size)
  return per_example * MNIST_EXAMPLES <= config.cache_max_gb * 2**30


def build_case(case: Case, args) -> dict[str, Any]:
  """Builds ``case``'s train chunk and compiles its step; returns a call running K steps and
  the static figures."""
  mesh = sharding.data_mesh()
  k = steps_per_dispatch_for(case.batch, case.size, args.steps_per_dispatch)
  config, index = load_config(args.config, case, k)
  pool = max(256, 2 * case.batch)  # Examples on device that batches are drawn from.
  config.eval_batch_size = pool
  model = models.create(config.model, NUM_CLASSES, mesh.shape[sharding.DATA_AXIS])
  variables = random_variables(model, case.size, args.seed)
  phase = phases.build_phase(config, index, model, variables["params"], pool)
  if case.cached and not phase.cut:
    raise ValueError(f"{case.label}: the phase has no frozen prefix to cache.")
  trainer_caches = bool(phase.cut) and cache_fits(model, phase.cut, variables, config)
  rng = np.random.default_rng(args.seed)
  view = transforms.EvalView.from_config(config)
  replicate = lambda tree: sharding.put(tree, sharding.replicated(mesh))  # As the trainer.
  inputs = replicate({"images": rng.integers(0, 256, (pool, *MNIST_SHAPE), np.uint8)})
  labels = replicate(rng.integers(0, NUM_CLASSES, pool).astype(np.int32))
  variables = replicate(variables)
  if case.cached:
    source = sources.DeviceSource(inputs, labels, mesh)
    inputs, = prefix.build_prefix_caches(variables, source, model=model, cuts=(phase.cut,), view=view,
                                        batch_size=config.eval_batch_size, mesh=mesh)
  else:
    phase = dataclasses.replace(phase, cut=0)  # What the trainer does when it cannot cache.
  if case.grad == "everything":  # Every parameter in the gradient; the optimizer still masks.
    phase = dataclasses.replace(
        phase, labels=jax.tree.map(lambda _: freezing.TRAIN, phase.labels), frozen_until=0)
  state = replicate(phases.init_state(phase, jax.tree.map(jnp.copy, variables), config.seed))
  indices = [sharding.put(rng.integers(0, pool, (k, case.batch), np.int32),
                          sharding.batch_sharded(mesh, 1)) for _ in range(4)]
  chunk = dispatch.make_train_chunk(phase, model, view)
  batches = contextlib.nullcontext if case.microbatch else whole_batches
  with batches():  # Steps are traced when they first compile.
    figures = analyse_step(chunk, lambda: dispatch.make_train_chunk(phase, model, view),
                           state, inputs, labels, indices[0][:1])
  holder = {"state": state, "calls": 0}

  def call():
    holder["state"], metrics = chunk(holder["state"], inputs, labels,
                                     indices[holder["calls"] % len(indices)])
    holder["calls"] += 1
    jax.device_get(metrics)

  t0 = time.perf_counter()
  with batches():
    call()  # Compiles the trainer's own step.
  first_call_s = time.perf_counter() - t0
  call()
  return {"call": call, "steps_per_call": k, "first_call_s": first_call_s,
          "trainer_default": case.cached == trainer_caches and not case.is_lever,
          "trainable_params": sum(r.size for r in phase.reports
                                  if r.rule.action == freezing.TRAIN),
          **figures}


@contextlib.contextmanager
def whole_batches():
  """Steps traced inside run every per-example computation on the whole batch at once."""
  with mock.patch.object(microbatch, "PIXELS", sys.maxsize):
    yield


def analyse_step(chunk, make_chunk, state, inputs, labels, indices_1B) -> dict[str, float]:
  """Compile time, FLOPs and memory of one step: ``chunk`` over one batch, compiled whole.
  Where that runs micro-batches, the FLOPs are counted on a new chunk (``make_chunk()``) in
  whole batches: XLA's cost analysis counts a loop's body once."""
  def compile_step(chunk):
    return jax.jit(chunk, donate_argnums=0).lower(state, inputs, labels, indices_1B).compile()

  t0 = time.perf_counter()
  compiled = compile_step(chunk)
  compile_s = time.perf_counter() - t0
  if " while(" in compiled.as_text():  # Micro-batches: count them on the whole batch.
    with whole_batches():
      compiled_whole = compile_step(make_chunk())
  else:
    compiled_whole = compiled
  cost = compiled_whole.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  return {"compile_s": compile_s, "flops": float(cost.get("flops", 0.0)),
          "temp_bytes": memory.temp_size_in_bytes,
          "peak_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         - memory.alias_size_in_bytes + memory.temp_size_in_bytes)}


# ---------------------------------------------------------------------------------------------
# The machine's ceiling.
# ---------------------------------------------------------------------------------------------


def matmul_size() -> int:
  return MATMUL_SIZE.get(jax.default_backend(), 8192)


def make_matmul() -> Callable[[], Any]:
  """A warmed-up call of a jitted float32 square matrix product (default precision): the
  machine's ceiling."""
  n = matmul_size()
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  matmul = jax.jit(jnp.dot)
  call = lambda: jax.block_until_ready(matmul(a, a))
  call()
  return call


# ---------------------------------------------------------------------------------------------
# One batch size and input size: every case and baseline timed in alternating rounds.
# ---------------------------------------------------------------------------------------------


def group_cases(phases: list[str], batch: int, size: int, levers: bool) -> list[Case]:
  """Uncached and (where the prefix is frozen) cached steps; the levers if asked."""
  cases = []
  for phase in phases:
    cases.append(Case(phase, False, batch, size))
    if phase != "full":
      cases.append(Case(phase, True, batch, size))
  if levers:
    other = "xla" if depthwise.resolve_impl("auto") == "shifted" else "shifted"
    cases += [Case(p, False, batch, size, grad="everything")
              for p in ("frozen_base", "fine_tune") if p in phases]
    cases += [Case(p, False, batch, size, depthwise=other) for p in ("fine_tune",)
              if p in phases]
    cases += [Case(p, False, batch, size, microbatch=False)
              for p in ("frozen_base", "fine_tune") if p in phases]
    if jax.default_backend() != "cpu":  # bfloat16 is emulated, hence slow, on CPUs.
      cases += [Case(p, False, batch, size, dtype="bfloat16") for p in phases]
  return cases


def start_workers(baselines, phases, batch, size, args) -> dict[tuple, Worker]:
  """One worker process per baseline and phase, started and left compiling."""
  workers = {}
  for kind in baselines:
    for phase in phases:
      print(f"starting {kind} {phase}, batch {batch}, {size}x{size} ...", flush=True)
      python = args.tf_python if kind == "keras_tf" else sys.executable
      workers[kind, phase] = Worker(kind, phase, batch, size, python, args.seed)
  return workers


def await_workers(workers: dict[tuple, Worker], failed: dict[str, str]) -> dict[tuple, Worker]:
  """The workers that got ready; a baseline that fails once is recorded and skipped after."""
  ready = {}
  for (kind, phase), worker in workers.items():
    try:
      if kind in failed:
        raise WorkerError(failed[kind])
      worker.wait_ready()
      ready[kind, phase] = worker
    except WorkerError as e:
      failed[kind] = str(e)
      print(f"  {kind} {phase} skipped: {e}", flush=True)
      worker.close()
  return ready


def measure_group(cases: list[Case], args, failed: dict[str, str]):
  """Compiles and times ``cases`` and the baselines at the first case's batch size and input
  size, all in alternating rounds; returns case rows and baseline rows."""
  batch, size = cases[0].batch, cases[0].size
  baselines = [kind for kind in args.baselines if kind not in failed]
  # An accelerator's host has cores to spare: the baselines compile while tljax does. On a
  # CPU they start after, so that no compile time is measured on a shared core.
  overlap = jax.default_backend() != "cpu"
  workers = start_workers(baselines, args.phases, batch, size, args) if overlap else {}
  built = {}
  try:
    for case in cases:
      print(f"compiling {case.label}, batch {case.batch}, {case.size}x{case.size} ...",
            flush=True)
      built[case] = build_case(case, args)
    matmul = make_matmul()
    if not overlap:
      workers = start_workers(baselines, args.phases, batch, size, args)
    workers = await_workers(workers, failed)
    times = {key: [] for key in ["matmul", *built, *workers]}
    for r in range(args.rounds):
      print(f"timing round {r + 1}/{args.rounds} ...", flush=True)
      times["matmul"] += time_calls(matmul, args.seconds / 2, min_calls=3)
      for case, b in built.items():
        times[case] += [t / b["steps_per_call"] for t in time_calls(b["call"], args.seconds)]
      for key, worker in workers.items():
        times[key] += worker.time(args.seconds)
  finally:
    for worker in workers.values():
      worker.close()
  ceiling = 2 * matmul_size()**3 / statistics.median(times["matmul"]) / 1e9
  rows = []
  for case, b in built.items():
    stats = summarize(times[case], case.batch)
    gflops = b["flops"] / (stats["median_ms"] / 1e3) / 1e9
    rows.append({**dataclasses.asdict(case), "label": case.label,
                 **{k: v for k, v in b.items() if k != "call"}, **stats,
                 "gflop_per_s": gflops, "matmul_gflop_per_s": ceiling,
                 "ceiling_fraction": gflops / ceiling})
  baseline_rows = [{"framework": kind, "phase": phase, "batch": batch, "size": size,
                    **workers[kind, phase].info, **summarize(times[kind, phase], batch)}
                   for kind, phase in workers]
  return rows, baseline_rows


# ---------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------


def _trainer_row(rows: list[dict], phase: str, batch: int, size: int, cached: bool | None):
  """The trainer's step for ``phase`` (its default variant if ``cached`` is None)."""
  return next(r for r in rows if (r["phase"], r["batch"], r["size"]) == (phase, batch, size)
              and not _is_lever(r)
              and (r["trainer_default"] if cached is None else r["cached"] == cached))


def _is_lever(row: dict) -> bool:
  return Case(**{f.name: row[f.name] for f in dataclasses.fields(Case)}).is_lever


def lever_rows(rows: list[dict]) -> list[dict]:
  """Each lever case against the same case with the trainer's choices."""
  out = []
  for r in rows:
    if not _is_lever(r):
      continue
    base = _trainer_row(rows, r["phase"], r["batch"], r["size"], r["cached"])
    lever = ("gradient of every parameter, then mask" if r["grad"] != "partial"
             else f"depthwise {r['depthwise']} instead of auto" if r["depthwise"] != "auto"
             else f"{r['dtype']} compute instead of float32" if r["dtype"] != "float32"
             else "whole batches instead of micro-batches")
    out.append({"lever": lever, "case": base["label"], "batch": r["batch"], "size": r["size"],
                "trainer_ms": base["median_ms"], "lever_ms": r["median_ms"],
                "lever_slowdown": r["median_ms"] / base["median_ms"]})
  return out


def ratio_rows(rows: list[dict], baseline_rows: list[dict]) -> list[dict]:
  """tljax images/s over each baseline's, for the trainer's default step and uncached."""
  out = []
  for b in baseline_rows:
    default = _trainer_row(rows, b["phase"], b["batch"], b["size"], None)
    uncached = _trainer_row(rows, b["phase"], b["batch"], b["size"], False)
    out.append({"phase": b["phase"], "batch": b["batch"], "size": b["size"],
                "baseline": b["framework"], "baseline_images_per_s": b["images_per_s"],
                "tljax_images_per_s": default["images_per_s"],
                "tljax_variant": "cached" if default["cached"] else "uncached",
                "ratio": default["images_per_s"] / b["images_per_s"],
                "uncached_ratio": uncached["images_per_s"] / b["images_per_s"]})
  return out


def report(rows, baseline_rows) -> dict[str, list[dict]]:
  """Prints the tables; returns them as JSON-ready lists."""
  for r in rows:
    r["default"] = "*" if r["trainer_default"] else ""
    r["mflop"] = r["flops"] / 1e6
    r["temp_mb"], r["peak_mb"] = r["temp_bytes"] / 2**20, r["peak_bytes"] / 2**20
  print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, host CPU "
        f"{cpu_model()}; * = the trainer's default step; ceiling = float32 matmul "
        "timed in the same rounds")
  print_table(rows, [("case", "label", ""), ("", "default", ""), ("batch", "batch", "d"),
                     ("size", "size", "d"), ("K", "steps_per_call", "d"),
                     ("compile s", "compile_s", ".1f"), ("median ms", "median_ms", ".2f"),
                     ("p90 ms", "p90_ms", ".2f"), ("images/s", "images_per_s", ".0f"),
                     ("MFLOP/step", "mflop", ".0f"), ("GFLOP/s", "gflop_per_s", ".1f"),
                     ("ceiling", "matmul_gflop_per_s", ".0f"),
                     ("of ceiling", "ceiling_fraction", ".1%"), ("temp MB", "temp_mb", ".0f"),
                     ("peak MB", "peak_mb", ".0f")])
  levers = lever_rows(rows)
  if levers:
    print("\nlevers (the lever's step time over the trainer's)")
    print_table(levers, [("lever", "lever", ""), ("case", "case", ""), ("batch", "batch", "d"),
                         ("size", "size", "d"), ("trainer ms", "trainer_ms", ".2f"),
                         ("lever ms", "lever_ms", ".2f"), ("slowdown", "lever_slowdown", ".2f")])
  ratios = ratio_rows(rows, baseline_rows)
  if baseline_rows:
    print("\nbaselines")
    print_table(baseline_rows, [("framework", "framework", ""), ("phase", "phase", ""),
                                ("batch", "batch", "d"), ("size", "size", "d"),
                                ("compile s", "compile_s", ".1f"),
                                ("median ms", "median_ms", ".2f"), ("p90 ms", "p90_ms", ".2f"),
                                ("images/s", "images_per_s", ".0f")])
    print("\ntljax images/s over the baseline's (the trainer's default step; uncached step)")
    print_table(ratios, [("phase", "phase", ""), ("batch", "batch", "d"), ("size", "size", "d"),
                         ("vs", "baseline", ""), ("tljax step", "tljax_variant", ""),
                         ("ratio", "ratio", ".1f"), ("uncached", "uncached_ratio", ".1f")])
  return {"rows": rows, "levers": levers, "baselines": baseline_rows, "ratios": ratios}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--phases", default=",".join(PHASES),
                      help=f"comma-separated phase kinds: {', '.join(PHASES)}")
  parser.add_argument("--batch_sizes", default="32", help="comma-separated batch sizes")
  parser.add_argument("--sizes", default="32", help="comma-separated square input sizes")
  parser.add_argument("--extra", default="frozen_base:cached:512:32,fine_tune:cached:128:32",
                      help="more 'phase:cached|uncached:batch:size' cases, timed with the "
                           "first batch size and size")
  parser.add_argument("--config", default=str(REPO / "configs" / "mnist_mnv2.py"),
                      help="config file whose phases[0] and phases[1] are the phase kinds")
  parser.add_argument("--steps_per_dispatch", type=int, default=0,
                      help="train steps per call (host sync); 0: about 128 32x32-image-equivalents")
  parser.add_argument("--no_levers", dest="levers", action="store_false",
                      help="skip the lever cases (run at the first batch size and size)")
  parser.add_argument("--baselines", nargs="?", const=",".join(BASELINES), default="",
                      help=f"comma-separated, of {', '.join(BASELINES)}; bare: all")
  parser.add_argument("--tf_python", default=sys.executable,
                      help="Python interpreter that can import tensorflow, for keras_tf")
  parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
  parser.add_argument("--seconds", type=float, default=1.0, help="per round and case")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="step_throughput.json")
  args = parser.parse_args()
  args.phases = [p for p in args.phases.split(",") if p]
  args.baselines = [b for b in args.baselines.split(",") if b]
  bad = [p for p in args.phases if p not in PHASES] + \
        [b for b in args.baselines if b not in BASELINES]
  if bad or not args.phases:
    parser.error(f"unknown or missing --phases/--baselines value(s) {bad}; phases are "
                 f"{list(PHASES)}, baselines {list(BASELINES)}.")
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  args.sizes = [int(s) for s in args.sizes.split(",")]
  try:
    args.extra = [parse_case(c) for c in args.extra.split(",") if c]
  except ValueError as e:
    parser.error(str(e))
  return args


def main():
  args = parse_args()
  failed = {}
  result = {"device": str(jax.devices()[0]), "cpu": cpu_model(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": [], "levers": [], "baselines": [],
            "ratios": [], "baselines_failed": failed}
  for i, (size, batch) in enumerate((s, b) for s in args.sizes for b in args.batch_sizes):
    cases = group_cases(args.phases, batch, size, levers=args.levers and i == 0)
    cases += args.extra if i == 0 else []
    for key, tables in report(*measure_group(cases, args, failed)).items():
      result[key] += tables
    # After every group, so that a run stopped part-way keeps what it measured.
    write_json(args.out, result)
  for kind, message in failed.items():
    print(f"\n{kind} not measured: {message}")


if __name__ == "__main__":
  main()
