#!/usr/bin/env bash
# The accelerator figures in benchmarks/README.md, in one go. Parts, by default all, in this
# order (most important first):
#   b32_s32       the step benchmark at batch 32, 32x32 (the targets' case) with the
#                 Keras-on-JAX baseline (stops here if it fails: the rest would fail the same way);
#   recipe        the tutorial's whole recipe (configs/mnist_mnv2.py), timed end to end;
#   b128_s224     the step benchmark at batch 128, 224x224: levers (bfloat16 among them) and
#                 the Keras baseline;
#   grid_s32      the rest of the grid at 32x32 (batch 128 and 512);
#   grid_s224     the rest of the grid at 224x224 (batch 512);
#   recipe_tuned  the tuned recipe (configs/mnist_mnv2_tuned.py), timed end to end.
# Each part has a time limit, so one slow part cannot take the others' time; together they add
# up to about an hour. Compiling dominates: on an H100 (jax 0.11.2) 1-15 s per tljax case and
# 14-20 s per Keras baseline process at batch 32, 32x32, more at 224x224.
#
#   benchmarks/accelerator.sh OUT_DIR MNIST_DIR WEIGHTS_H5 [PART[:LIMIT_S]...]
#
# e.g. `... recipe:170 b128_s224:230` runs those two parts with those limits. PYTHON picks the
# interpreter; BENCH_ARGS adds arguments to every step benchmark (e.g. "--rounds 2").
# OUT_DIR receives step_*.json, recipe_*.json (each run's summary.json) and log.txt.
set -uo pipefail
python=${PYTHON:-python3}
out=${1:?OUT_DIR}; data=${2:?MNIST_DIR}; weights=${3:?WEIGHTS_H5}; shift 3
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(b32_s32 recipe b128_s224 grid_s32 grid_s224 recipe_tuned)
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1

part() {  # part LIMIT_S NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e '^W[0-9]' -e 'Warning' | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "=== $name: status $status, $((SECONDS - t0)) s" | tee -a "$log"
  return "$status"
}

recipe() {  # recipe NAME CONFIG LIMIT_S
  local workdir; workdir=$(mktemp -d)
  part "$3" "recipe $1" "$python" main.py --config "$2" --workdir "$workdir" \
    --config.data.dir="$data" --config.model.weights="$weights"
  cp "$workdir/summary.json" "$out/recipe_$1.json" 2>/dev/null
}

bench() {  # bench LIMIT_S NAME ARGS...
  local limit=$1 name=$2; shift 2
  # shellcheck disable=SC2086  # BENCH_ARGS is split into arguments on purpose.
  part "$limit" "step $name" "$python" benchmarks/step_throughput.py --out "$out/step_$name.json" \
    "$@" ${BENCH_ARGS:-}
}

{ nvidia-smi -L; "$python" -c 'import jax, flax, optax, orbax.checkpoint as o, sys
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax",
      optax.__version__, "orbax", o.__version__, jax.devices())'; } 2>&1 | tee -a "$log"

for spec in "${parts[@]}"; do
  name=${spec%%:*}; limit=${spec#"$name"}; limit=${limit#:}
  case $name in
    b32_s32)
      bench "${limit:-400}" b32_s32 --no_levers --extra "" --baselines keras_jax
      status=$?; if [ $status -ne 0 ] && [ $status -ne 124 ]; then exit 3; fi ;;
    recipe) recipe mnist configs/mnist_mnv2.py "${limit:-300}" ;;
    b128_s224) bench "${limit:-900}" b128_s224 --batch_sizes 128 --sizes 224 --extra "" \
                 --baselines keras_jax ;;
    grid_s32) bench "${limit:-600}" grid_s32 --batch_sizes 128,512 --sizes 32 --no_levers \
                --extra "" ;;
    grid_s224) bench "${limit:-900}" grid_s224 --batch_sizes 512 --sizes 224 --no_levers \
                 --extra "" ;;
    recipe_tuned) recipe mnist_tuned configs/mnist_mnv2_tuned.py "${limit:-600}" ;;
    *) echo "unknown part '$name': expected one of b32_s32 recipe b128_s224 grid_s32" \
         "grid_s224 recipe_tuned, optionally with ':LIMIT_S'" >&2; exit 2 ;;
  esac
done
