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
partition only), the other depthwise implementation, frozen layers in whole batches instead of
micro-batches, and bfloat16 on accelerators.
Baselines: the same model and trainable set in Keras 3 (``train_on_batch``, Adam), each in its
own process running ``keras_worker.py`` (tf.keras with ``--tf_python``, which needs TensorFlow
only). All cases of one batch size and input size, baselines included, are timed in
alternating rounds, so their ratios are measured side by side on a possibly busy machine.
Prints tables and writes JSON.
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import operator
import os
import pathlib
import runpy
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

import xla_cost  # noqa: E402
from keras_worker import KINDS as BASELINES, ready_workers, start_workers  # noqa: E402
from timing import cpu_model, print_table, summarize, time_calls, time_rounds  # noqa: E402
from timing import write_json  # noqa: E402
from tljax import dispatch, freezing, models, phases, prefix, sharding  # noqa: E402
from tljax.data import sources, transforms  # noqa: E402
from tljax.models import depthwise, microbatch  # noqa: E402

# Phase kind -> (index into config.phases, rules replacing that phase's, or None).
PHASES = {"frozen_base": (0, None), "fine_tune": (1, None), "full": (1, ("train:.*",))}
MNIST_SHAPE = (28, 28)
MNIST_EXAMPLES = 60_000    # Train + validation images the trainer would cache.
NUM_CLASSES = 10
# The levers, Case fields away from the trainer's choice: label suffix, what the lever does.
LEVERS = {"grad": (" grad-everything", "gradient of every parameter, then mask"),
          "depthwise": (" dw-{}", "depthwise {} instead of auto"),
          "dtype": (" {}", "{} compute instead of float32"),
          "microbatch": (" whole-batch", "whole batches instead of micro-batches")}


# ------------------------------------------------------------------ tljax cases


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
  def levers(self) -> list[str]:
    """The fields of LEVERS where this case differs from the trainer's step."""
    return [f.name for f in dataclasses.fields(self)
            if f.name in LEVERS and getattr(self, f.name) != f.default]

  @property
  def label(self) -> str:
    return (f"{self.phase} {'cached' if self.cached else 'uncached'}"
            + "".join(LEVERS[f][0].format(getattr(self, f)) for f in self.levers))


def parse_case(text: str) -> Case:
  """``"phase:cached|uncached:batch:size"``, e.g. ``"fine_tune:cached:128:32"``."""
  parts = text.split(":")
  if len(parts) != 4 or parts[0] not in PHASES or parts[1] not in ("cached", "uncached"):
    raise argparse.ArgumentTypeError(
        f"case {text!r} is not 'phase:cached|uncached:batch:size' with phase in "
        f"{list(PHASES)}, e.g. 'fine_tune:cached:128:32'.")
  return Case(parts[0], parts[1] == "cached", int(parts[2]), int(parts[3]))


def load_config(path: str, case: Case, steps_per_dispatch: int):
  """The config at ``path`` set up for ``case``; also the index of its phase."""
  config = runpy.run_path(path)["get_config"]()
  index, rules = PHASES[case.phase]
  config.update(batch_size=case.batch, steps_per_dispatch=steps_per_dispatch)
  config.model.update(input_size=case.size, depthwise=case.depthwise, dtype=case.dtype)
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


def build_case(case: Case, args) -> tuple[Callable[[], None], dict[str, Any]]:
  """Builds ``case``'s train chunk and compiles its step; returns a call running K steps and
  the static figures."""
  mesh = sharding.data_mesh()
  k = args.steps_per_dispatch or max(1, round(128 / case.batch * (32 / case.size) ** 2))
  config, index = load_config(args.config, case, k)
  pool = max(256, 2 * case.batch)  # Examples on device that batches are drawn from.
  model = models.create(config.model, NUM_CLASSES, mesh.shape[sharding.DATA_AXIS])
  variables = random_variables(model, case.size, args.seed)
  phase = phases.build_phase(config, index, model, variables["params"], pool)
  if case.cached and not phase.cacheable_cut:
    raise ValueError(f"{case.label}: the phase has no frozen prefix to cache.")
  trainer_cut, _ = prefix.plan_caches(model, variables, cut=phase.cacheable_cut, next_cut=0,
                                      examples=MNIST_EXAMPLES, input_size=case.size,
                                      max_gb=config.cache_max_gb)
  cut = phase.cacheable_cut if case.cached else 0  # The step runs layers[cut:]; 0: images.
  rng = np.random.default_rng(args.seed)
  view = transforms.EvalView.from_config(config)
  replicate = lambda tree: sharding.put(tree, sharding.replicated(mesh))  # As the trainer.
  inputs = replicate({"images": rng.integers(0, 256, (pool, *MNIST_SHAPE), np.uint8)})
  labels = replicate(rng.integers(0, NUM_CLASSES, pool).astype(np.int32))
  variables = replicate(variables)
  if cut:
    inputs, = prefix.build_prefix_caches(
        variables, sources.DeviceSource(inputs, labels, mesh), model=model, cuts=(cut,),
        view=view, batch_size=pool, mesh=mesh)
  if case.grad == "everything":  # Every parameter in the gradient; the optimizer still masks.
    phase = dataclasses.replace(
        phase, labels=jax.tree.map(lambda _: freezing.TRAIN, phase.labels), frozen_until=0)
  state = replicate(phases.init_state(phase, jax.tree.map(jnp.copy, variables), config.seed))
  indices = [sharding.put(rng.integers(0, pool, (k, case.batch), np.int32),
                          sharding.batch_sharded(mesh, 1)) for _ in range(4)]
  make_chunk = functools.partial(dispatch.make_train_chunk, phase, model, cut, view)
  chunk = make_chunk()
  cycle = itertools.cycle(indices)

  def call():
    nonlocal state
    state, metrics = chunk(state, inputs, labels, next(cycle))
    jax.device_get(metrics)

  batches = contextlib.nullcontext if case.microbatch else whole_batches
  with batches():  # Steps are traced when they first compile.
    figures = analyse_step(chunk, make_chunk, state, inputs, labels, indices[0][:1])
    t0 = time.perf_counter()
    call()  # Compiles the trainer's own step.
    first_call_s = time.perf_counter() - t0
  call()
  return call, {"steps_per_call": k, "first_call_s": first_call_s,
                "trainer_default": case.cached == bool(trainer_cut) and not case.levers,
                "trainable_params": sum(r.size for r in phase.reports
                                        if r.rule.action == freezing.TRAIN),
                **figures}


# Steps traced inside this context run every per-example computation on the whole batch.
whole_batches = functools.partial(mock.patch.object, microbatch, "PIXELS", sys.maxsize)


def analyse_step(chunk, make_chunk, state, inputs, labels, indices_1B) -> dict[str, float]:
  """Compile time, FLOPs and memory of one step: ``chunk`` over one batch, compiled whole.
  Where that runs micro-batches, the FLOPs are counted on a new chunk (``make_chunk()``) in
  whole batches: XLA's cost analysis counts a loop's body once."""
  def compile_step(chunk):
    return jax.jit(chunk, donate_argnums=0).lower(state, inputs, labels, indices_1B).compile()

  t0 = time.perf_counter()
  compiled = compiled_whole = compile_step(chunk)
  compile_s = time.perf_counter() - t0
  if " while(" in compiled.as_text():  # Micro-batches: count them on the whole batch.
    with whole_batches():
      compiled_whole = compile_step(make_chunk())
  return {"compile_s": compile_s, "flops": xla_cost.flops(compiled_whole),
          **xla_cost.memory_bytes(compiled)}


# ------------------- one batch size and input size, timed in alternating rounds


def group_cases(phases: list[str], batch: int, size: int, levers: bool) -> list[Case]:
  """Uncached and (where the prefix is frozen) cached steps; the levers if asked."""
  cases = [Case(p, cached, batch, size) for p in phases
           for cached in ((False,) if p == "full" else (False, True))]
  if levers:
    other = "xla" if depthwise.resolve_impl("auto") == "shifted" else "shifted"
    frozen = [Case(p, False, batch, size) for p in ("frozen_base", "fine_tune") if p in phases]
    cases += [dataclasses.replace(c, grad="everything") for c in frozen]
    cases += [dataclasses.replace(c, depthwise=other) for c in frozen if c.phase == "fine_tune"]
    cases += [dataclasses.replace(c, microbatch=False) for c in frozen]
    if jax.default_backend() != "cpu":  # bfloat16 is emulated, hence slow, on CPUs.
      cases += [Case(p, False, batch, size, dtype="bfloat16") for p in phases]
  return cases


def measure_group(cases: list[Case], args, failed: dict[str, str]):
  """Compiles and times ``cases`` and the baselines at the first case's batch size and input
  size, all in alternating rounds; returns the cases' rows by case, and the baselines' rows."""
  batch, size = cases[0].batch, cases[0].size
  start = functools.partial(start_workers, [k for k in args.baselines if k not in failed],
                            args.phases, batch, size, args.tf_python, args.seed)
  # An accelerator's host has cores to spare: the baselines compile while tljax does. On a
  # CPU they start after, so that no compile time is measured on a shared core.
  overlap = jax.default_backend() != "cpu"
  workers = start() if overlap else {}
  built = {}
  try:
    for case in cases:
      print(f"compiling {case.label}, batch {case.batch}, {case.size}x{case.size} ...", flush=True)
      built[case] = build_case(case, args)
    matmul, matmul_flops = xla_cost.make_matmul()
    if not overlap:
      workers = start()
    workers = ready_workers(workers, failed)
    times = time_rounds(
        {"matmul": functools.partial(time_calls, matmul, args.seconds / 2, min_calls=3),
         **{case: functools.partial(time_calls, call, args.seconds)
            for case, (call, _) in built.items()},
         **{key: functools.partial(worker.time, args.seconds) for key, worker in workers.items()}},
        args.rounds)
  finally:
    for worker in workers.values():
      worker.close()
  ceiling = matmul_flops / statistics.median(times["matmul"]) / 1e9
  rows = {case: case_row(case, figures, times[case], ceiling)
          for case, (_, figures) in built.items()}
  baseline_rows = [{"framework": kind, "phase": phase, "batch": batch, "size": size,
                    **workers[kind, phase].info, **summarize(times[kind, phase], batch)}
                   for kind, phase in workers]
  return rows, baseline_rows


def case_row(case: Case, figures: dict, call_times: list[float], ceiling: float) -> dict:
  """A case's row: its figures, step times and achieved GFLOP/s, also in the tables' units."""
  stats = summarize([t / figures["steps_per_call"] for t in call_times], case.batch)
  rate = figures["flops"] / (stats["median_ms"] / 1e3) / 1e9
  return {**dataclasses.asdict(case), "label": case.label, **figures, **stats,
          "gflop_per_s": rate, "matmul_gflop_per_s": ceiling, "ceiling_fraction": rate / ceiling,
          "default": "*" if figures["trainer_default"] else "", "mflop": figures["flops"] / 1e6,
          "temp_mb": figures["temp_bytes"] / 2**20, "peak_mb": figures["peak_bytes"] / 2**20}


# -------------------------------------------------------------------- reporting


def trainer_row(rows: dict[Case, dict], like: dict, cached: bool | None) -> dict:
  """The trainer's step at the phase, batch and size of the row ``like``; its default variant
  if ``cached`` is None."""
  key = operator.itemgetter("phase", "batch", "size")
  return next(r for c, r in rows.items() if key(r) == key(like) and not c.levers
              and (r["trainer_default"] if cached is None else c.cached == cached))


def lever_rows(rows: dict[Case, dict]) -> list[dict]:
  """Each lever case against the same case with the trainer's choices."""
  out = []
  for case, r in rows.items():
    if case.levers:
      base = trainer_row(rows, r, case.cached)
      lever = LEVERS[case.levers[0]][1].format(getattr(case, case.levers[0]))
      out.append({"lever": lever, "case": base["label"], "batch": case.batch, "size": case.size,
                  "trainer_ms": base["median_ms"], "lever_ms": r["median_ms"],
                  "lever_slowdown": r["median_ms"] / base["median_ms"]})
  return out


def ratio_rows(rows: dict[Case, dict], baseline_rows: list[dict]) -> list[dict]:
  """tljax images/s over each baseline's, for the trainer's default step and uncached."""
  out = []
  for b in baseline_rows:
    default, uncached = trainer_row(rows, b, None), trainer_row(rows, b, False)
    out.append({"phase": b["phase"], "batch": b["batch"], "size": b["size"],
                "baseline": b["framework"], "baseline_images_per_s": b["images_per_s"],
                "tljax_images_per_s": default["images_per_s"],
                "tljax_variant": "cached" if default["cached"] else "uncached",
                "ratio": default["images_per_s"] / b["images_per_s"],
                "uncached_ratio": uncached["images_per_s"] / b["images_per_s"]})
  return out


def report(rows: dict[Case, dict], baseline_rows: list[dict]) -> dict[str, list[dict]]:
  """Prints the tables; returns them as JSON-ready lists."""
  print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, host CPU "
        f"{cpu_model()}; * = the trainer's default step; ceiling = float32 matmul "
        "timed in the same rounds")
  shape = [("batch", "batch", "d"), ("size", "size", "d")]
  step = [("compile s", "compile_s", ".1f"), ("median ms", "median_ms", ".2f"),
          ("p90 ms", "p90_ms", ".2f"), ("images/s", "images_per_s", ".0f")]
  print_table(list(rows.values()),
              [("case", "label", ""), ("", "default", ""), *shape, ("K", "steps_per_call", "d"),
               *step, ("MFLOP/step", "mflop", ".0f"), ("GFLOP/s", "gflop_per_s", ".1f"),
               ("ceiling", "matmul_gflop_per_s", ".0f"), ("of ceiling", "ceiling_fraction", ".1%"),
               ("temp MB", "temp_mb", ".0f"), ("peak MB", "peak_mb", ".0f")])
  levers = lever_rows(rows)
  if levers:
    print("\nlevers (the lever's step time over the trainer's)")
    print_table(levers, [("lever", "lever", ""), ("case", "case", ""), *shape,
                         ("trainer ms", "trainer_ms", ".2f"), ("lever ms", "lever_ms", ".2f"),
                         ("slowdown", "lever_slowdown", ".2f")])
  ratios = ratio_rows(rows, baseline_rows)
  if baseline_rows:
    print("\nbaselines")
    print_table(baseline_rows, [("framework", "framework", ""), ("phase", "phase", ""), *shape,
                                *step])
    print("\ntljax images/s over the baseline's (the trainer's default step; uncached step)")
    print_table(ratios, [("phase", "phase", ""), *shape, ("vs", "baseline", ""),
                         ("tljax step", "tljax_variant", ""), ("ratio", "ratio", ".1f"),
                         ("uncached", "uncached_ratio", ".1f")])
  return {"rows": list(rows.values()), "levers": levers, "baselines": baseline_rows,
          "ratios": ratios}


def comma_list(item: Callable[[str], Any] = str, choices: tuple = ()):
  """An argparse type: comma-separated ``item`` values, each one of ``choices`` if given."""
  def comma_separated(text: str) -> list:
    values = [item(v) for v in text.split(",") if v]
    if choices and not set(values) <= set(choices):
      raise argparse.ArgumentTypeError(f"{text!r}: choose among {list(choices)}")
    return values
  return comma_separated


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--phases", default=",".join(PHASES), type=comma_list(choices=PHASES),
                      help=f"comma-separated phase kinds: {', '.join(PHASES)}")
  parser.add_argument("--batch_sizes", default="32", type=comma_list(int),
                      help="comma-separated batch sizes")
  parser.add_argument("--sizes", default="32", type=comma_list(int),
                      help="comma-separated square input sizes")
  parser.add_argument("--extra", default="frozen_base:cached:512:32,fine_tune:cached:128:32",
                      type=comma_list(parse_case),
                      help="more 'phase:cached|uncached:batch:size' cases, timed with the "
                           "first batch size and size")
  parser.add_argument("--config", default=str(REPO / "configs" / "mnist_mnv2.py"),
                      help="config file whose phases[0] and phases[1] are the phase kinds")
  parser.add_argument("--steps_per_dispatch", type=int, default=0,
                      help="train steps per call (host sync); 0: about 128 32x32-image-equivalents")
  parser.add_argument("--no_levers", dest="levers", action="store_false",
                      help="skip the lever cases (run at the first batch size and size)")
  parser.add_argument("--baselines", nargs="?", const=",".join(BASELINES), default="",
                      type=comma_list(choices=BASELINES),
                      help=f"comma-separated, of {', '.join(BASELINES)}; bare: all")
  parser.add_argument("--tf_python", default=sys.executable,
                      help="Python interpreter that can import tensorflow, for keras_tf")
  parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
  parser.add_argument("--seconds", type=float, default=1.0, help="per round and case")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="step_throughput.json")
  args = parser.parse_args()
  if not (args.phases and args.batch_sizes and args.sizes):
    parser.error("--phases, --batch_sizes and --sizes each need a value.")
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
