#!/usr/bin/env bash
# The prepared device run: what a lent GPU has to prove, in bounded time, in one call.
#
#   bash bench/gpu_session.sh [PHASE ...]      default phases: env tests check host bench profile
#   PHASE: env | tests | check | host | bench | profile | profile-model | tune | tune-patch | ncu
#
# Runs on any CUDA machine with torch, triton, pytest, pytest-xdist, pytest-benchmark and
# hypothesis installed and no network; phases are bounded so that a run fits one 10-minute command.
# Every phase has its own time limit (seconds; override through the environment):
#   TESTS_S=200  the whole test suite, natively (pytest -n 8; TESTS_ARGS: other pytest arguments)
#   CHECK_S=60   timellm-fast check
#   HOST_S=120   bench/host_overhead.py on this machine's CPU (calibrates the CPU-side proxy; compiles its kernels first)
#   BENCH_BUDGET_S=150  benchmark cases start in priority order (the performance targets first) until then;
#                BENCH_S=220 hard limit of the bench phase; BENCH_K: a pytest -k selection
#   PROFILE_S=60 bench/profile_trace.py (profile-model: twice, eager and ours)
#   TUNE_BUDGET_S=200   tile sweep of the attention kernels (bench/tune_attention.py; +120 s limit;
#                TUNE_ARGS: its other options, e.g. "--dropout" for the training tiles)
#   TUNE_PATCH_BUDGET_S=60  tile sweep of the patch embedding forward (bench/tune_patch_embedding.py;
#                +60 s limit; writes tune_patch.json)
#   NCU_S=150    Nsight Compute on the patch forward and the three attention kernels
#                (bench/ncu_kernels.py), into session.log; ncu needs a machine that exposes the
#                GPU's performance counters
# The default phases' limits add up to 570 s, so they fit one 600 s command; `tune` needs its own.
# Phase timings of past runs: bench/ROOFLINE.md. Files written to $OUT (./gpu-session-out without
# $OUT):
#   session.log (env, install, check, profile), tests.log, bench.log, tune.json, tune_patch.json,
#   results/results.json, results/results.md, results/speedup.png, results/memory.png
# Copy them to bench/results/<gpu>-<date>/ and commit; then `python bench/render_readme.py`.
# Real data: ../shared/data does not travel to the device machine. Copy the ETT CSVs into
# .gpu-data/ (git-ignored) and name it in the device call's carry; this script then points
# TIMELLM_FAST_DATA there (otherwise the inputs are the seeded synthetic series, and say so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
[ -f .gpu-data/ETTh1.csv ] && export TIMELLM_FAST_DATA="$PWD/.gpu-data"
LOG="$OUT/session.log"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(env tests check host bench profile)

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

install() {
  # no network on the device machine: no build isolation, no dependency resolution
  if ! $PY -c "import timellm_fast.kernels" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
      || $PY -m pip install -q --no-index --no-build-isolation --no-deps . >>"$LOG" 2>&1
  fi
  $PY -c "import timellm_fast.kernels" >>"$LOG" 2>&1 || { say "install FAILED"; exit 3; }
}

for phase in "${phases[@]}"; do
  case "$phase" in
    env)
      say "env"
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        $PY -c "import sys, torch, triton, numpy; print(sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
      } >>"$LOG" 2>&1
      install ;;
    tests)
      install
      say "tests (limit ${TESTS_S:-200} s)"
      TIMELLM_FAST_AOT_JOBS=8 timeout "${TESTS_S:-200}" $PY -m pytest ${TESTS_ARGS:-tests} -q -n 8 -p no:cacheprovider \
        -rfEsx --durations=15 >"$OUT/tests.log" 2>&1
      say "tests rc $? : $(tail -1 "$OUT/tests.log")" ;;
    check)
      install
      say "check"
      timeout "${CHECK_S:-60}" $PY -m timellm_fast check >>"$LOG" 2>&1
      say "check rc $?" ;;
    bench)
      install
      say "bench (cases start until ${BENCH_BUDGET_S:-150} s, limit ${BENCH_S:-220} s)"
      timeout "${BENCH_S:-220}" $PY -m timellm_fast bench --out "$OUT/results" \
        --budget-s "${BENCH_BUDGET_S:-150}" ${BENCH_K:+-k "$BENCH_K"} >"$OUT/bench.log" 2>&1
      say "bench rc $? : $(tail -1 "$OUT/bench.log")" ;;
    host)
      install
      say "host (op-layer host time per call, kernels launched on the recording driver, this CPU)"
      timeout "${HOST_S:-120}" $PY bench/host_overhead.py --calls 100 >>"$LOG" 2>&1
      say "host rc $?" ;;
    profile)
      install
      say "profile (input stage, training step, ETTh1-folded rows)"
      timeout "${PROFILE_S:-60}" $PY bench/profile_trace.py --rows 168 --out /tmp/timellm_fast_trace.json >>"$LOG" 2>&1
      say "profile rc $?" ;;
    profile-model)
      install
      say "profile-model (full GPT-2 Time-LLM training step, explained-example rows, eager then ours)"
      for flag in --eager ""; do
        timeout "${PROFILE_S:-60}" $PY bench/profile_trace.py --what model --rows 28 --d-llm 768 --d-keys 32 \
          $flag --top 25 --out /tmp/timellm_fast_model_trace.json >>"$LOG" 2>&1
        say "profile-model ${flag:-ours} rc $?"
      done ;;
    tune)
      install
      say "tune (budget ${TUNE_BUDGET_S:-200} s)"
      timeout $(( ${TUNE_BUDGET_S:-200} + 120 )) $PY bench/tune_attention.py --budget-s "${TUNE_BUDGET_S:-200}" \
        ${TUNE_ARGS:-} --out "$OUT/tune.json" >>"$LOG" 2>&1
      say "tune rc $?" ;;
    tune-patch)
      install
      say "tune-patch (budget ${TUNE_PATCH_BUDGET_S:-60} s)"
      timeout $(( ${TUNE_PATCH_BUDGET_S:-60} + 60 )) $PY bench/tune_patch_embedding.py \
        --budget-s "${TUNE_PATCH_BUDGET_S:-60}" --out "$OUT/tune_patch.json" >>"$LOG" 2>&1
      say "tune-patch rc $?" ;;
    ncu)
      install
      say "ncu (SpeedOfLight, Occupancy, LaunchStats, MemoryWorkloadAnalysis; 6 launches)"
      if command -v ncu >/dev/null 2>&1; then
        timeout "${NCU_S:-150}" ncu --clock-control none --kernel-name regex:"patch_window_fwd|attention_" \
          --launch-skip 6 --launch-count 6 --section SpeedOfLight --section Occupancy --section LaunchStats \
          --section MemoryWorkloadAnalysis $PY bench/ncu_kernels.py >>"$LOG" 2>&1
        say "ncu rc $?"
      else
        say "ncu not found"
      fi ;;
    *)
      say "unknown phase $phase (env tests check host bench profile profile-model tune tune-patch ncu)"; exit 2 ;;
  esac
done
say "done"
