#!/usr/bin/env bash
# fastdp's whole GPU validation in one device call of at most 8 minutes, or its CPU dry run.
#
#   bash bench/gpu_session.sh all             # env, ext, tests, steps, kernels (one device call)
#   bash bench/gpu_session.sh all --dry-run   # the same stages on CPU in ~2 min (tests/test_gpu_session.py)
#   bash bench/gpu_session.sh steps kernels   # some stages only (env always runs first)
#   bash bench/gpu_session.sh finetune        # not in all: GPT-2-medium largest batch (can pass 10 min)
#
# Stages, always in this order:
#   env       versions, GPU, nvcc; first pip-installs carried wheels ($GPU_SESSION_WHEELS/*.whl,
#             default .whl/) offline into the scratch folder, so e.g. Opacus can travel as a wheel
#   ext       the CUDA extension built in place (setup.py build_ext --inplace; the tests JIT-build it into
#             $TORCH_EXTENSIONS_DIR if that fails), then tests/test_cuda_extension.py
#   tests     the engine through the compiled Triton kernels, CUDA-graph steps and rounding bounds on
#             CUDA, with FASTDP_AUTOTUNE_CONFIGS=1 (one autotune config per kernel: compilation fits)
#   steps     python -m bench: mlp, resnet18, gpt2, lstm × nonprivate, fastdp-bk, fastdp-bk-per_layer,
#             fastdp-bk-cudagraph, + opacus-ghost, opacus-hooks when opacus imports; step time, peak memory
#   kernels   bench_kernels_linear (fp32), bench_kernels_conv_embedding_norms, bench_kernels_linear
#             (bf16): each kernel against cuBLAS/cuDNN, after a check against its torch reference
#   finetune  bench_largest_batch (only when named; give it its own call: its 3 files and all's 8 pass the limit)
# Each stage is cut (SIGINT, SIGKILL 5 s later) at its deadline: GPU_CAP_<STAGE> seconds after the
# previous stage's deadline (defaults below), so time a stage leaves unused passes on, and a stage that
# hangs cannot take the next one's time. Worst case for all: the sum of the caps, 475 s.
#
# --dry-run: the same stages on CPU (CUDA hidden, TRITON_INTERPRET=1): ext and the CUDA-graph rows say
# "skipped: no CUDA", steps run bench's --quick models, kernels their --smoke shapes in the interpreter.
#
# Output: $OUT (default ./gpu-out), at most 8 files (the device tool's limit), each written as soon as
# it exists: env.txt, cuda_ext.txt, tests.txt, steps.md + steps.json (python -m bench's results.md and
# results.json), kernels.txt, summary.md (rewritten after every stage, printed at the end: the table for
# bench/results/ and the README) and logs.tgz (stage table, bench's per-process logs). Scratch:
# $GPU_SESSION_WORK (default a fresh /tmp/fastdp-gpu-session.XXXXXX). Exit status: 0 when every stage
# is ok or skipped, 1 when one failed or timed out, 2 for bad arguments or no CUDA without --dry-run.
#
# Settings (environment): GPU_CAP_ENV=20 GPU_CAP_EXT=100 GPU_CAP_TESTS=75 GPU_CAP_STEPS=205
# GPU_CAP_KERNELS=75 GPU_CAP_FINETUNE=540 (seconds); GPU_SESSION_MODELS, GPU_SESSION_METHODS (comma
# lists for steps); FASTDP_AUTOTUNE_CONFIGS=N also shortens autotuning in steps and kernels (default:
# all configs there); GPU_FINETUNE_METHODS, GPU_FINETUNE_NONPRIVATE_LARGEST (bench_largest_batch's
# --methods and --nonprivate-largest).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY_RUN=0
SELECTED=" "
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    all) SELECTED+="ext tests steps kernels " ;;
    env | ext | tests | steps | kernels | finetune) SELECTED+="$arg " ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_session.sh: unknown stage or option '$arg'; stages: all env ext tests steps kernels finetune, option --dry-run" >&2
       exit 2 ;;
  esac
done
if [ "$SELECTED" = " " ]; then
  echo "gpu_session.sh: name the stages to run, e.g. 'bash bench/gpu_session.sh all' (or --dry-run on CPU); --help lists them" >&2
  exit 2
fi

OUT=${OUT:-gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
# a previous run's files would pass for this run's (the device empties $OUT itself; a local run may not)
rm -f "$OUT"/{env.txt,cuda_ext.txt,tests.txt,steps.md,steps.json,kernels.txt,summary.md,logs.tgz,finetune.txt,finetune.md,finetune.json}
WORK=${GPU_SESSION_WORK:-$(mktemp -d /tmp/fastdp-gpu-session.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || exit 2
WHEELS=${GPU_SESSION_WHEELS:-.whl}
[ -d "$WHEELS" ] && WHEELS=$(cd "$WHEELS" && pwd)
cd "$(dirname "$0")/.." || exit 2  # the repository root

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fastdp-torch-ext}  # a JIT build, if any, is kept
export TRITON_CACHE_AUTOTUNING=1  # autotune timings cached on disk: each bench process does not redo them
unset FASTDP_BACKEND
if (( DRY_RUN )); then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 GPU_SESSION_MODE="dry run on CPU"
  HAVE_CUDA=0
else
  unset TRITON_INTERPRET
  export GPU_SESSION_MODE="GPU run"
  HAVE_CUDA=1
fi

# -- stage machinery ----------------------------------------------------------------------------------
DEADLINE=0 FAILED=0 NO_CUDA=0
STAGE_TIMED_OUT=0 STAGE_SKIPPED="" STAGE_DETAIL=""
: > "$WORK/stages.tsv"

capped() {  # capped CMD...: CMD, cut at the current stage's deadline (SIGINT, then SIGKILL 5 s later)
  local left=$(( DEADLINE - $(date +%s) )) rc
  if (( left < 1 )); then
    STAGE_TIMED_OUT=1
    echo "gpu_session.sh: no time left in this stage for: $*"
    return 124
  fi
  timeout -s INT -k 5 "$left" "$@"
  rc=$?
  if (( rc == 124 || rc == 137 )); then
    STAGE_TIMED_OUT=1
    echo "gpu_session.sh: cut at the stage's deadline ($left s): $*"
  fi
  return $rc
}

note() { [ -n "$*" ] && STAGE_DETAIL="${STAGE_DETAIL:+$STAGE_DETAIL; }$*"; }

pytest_result() {  # the last "N passed, M failed ..." line of a pytest log
  grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$1" | tail -n 1 | tr -d '=' | sed -e 's/^ *//' -e 's/ *$//'
}

write_summary() {
  python -m bench.gpu_summary "$WORK" "$OUT" > /dev/null 2>> "$WORK/summary-errors.log" ||
    echo "gpu_session.sh: bench.gpu_summary failed (summary-errors.log in logs.tgz)"
  tar -czf "$OUT/logs.tgz" --exclude=./site -C "$WORK" . 2> /dev/null
}

run_stage() {  # run_stage NAME CAP: stage_NAME with a deadline CAP s after the previous one's; records its status
  local name=$1 cap=$2 start rc took status
  start=$(date +%s)
  (( DEADLINE == 0 )) && DEADLINE=$start
  DEADLINE=$(( DEADLINE + cap ))
  STAGE_TIMED_OUT=0 STAGE_SKIPPED="" STAGE_DETAIL=""
  echo "== $name: up to $(( DEADLINE - start )) s"
  "stage_$name"
  rc=$?
  took=$(( $(date +%s) - start ))
  if [ -n "$STAGE_SKIPPED" ]; then status="skipped: $STAGE_SKIPPED"
  elif (( STAGE_TIMED_OUT )); then status="timed out"; FAILED=1
  elif (( rc != 0 )); then status="failed (exit $rc)"; FAILED=1
  else status="ok"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$(printf '%s' "$STAGE_DETAIL" | tr '\t\n' '  ')" >> "$WORK/stages.tsv"
  echo "   $name: $status after $took s${STAGE_DETAIL:+ ($STAGE_DETAIL)}"
  write_summary
}

# -- stages -------------------------------------------------------------------------------------------
install_wheels() {  # carried wheels, offline, into $WORK/site (on PYTHONPATH)
  local wheels=("$WHEELS"/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    echo "wheels: none carried ($WHEELS/*.whl)"
    return 0
  fi
  echo "wheels: installing ${wheels[*]##*/} offline into $WORK/site"
  export GPU_SESSION_WHEEL_NAMES
  GPU_SESSION_WHEEL_NAMES=$(printf '%s\n' "${wheels[@]##*/}" | cut -d- -f1 | paste -sd, -)
  capped python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "${wheels[@]}"
}

stage_env() {
  local file="$OUT/env.txt" rc=0
  : > "$file"
  install_wheels >> "$file" 2>&1 || rc=$?
  if command -v nvidia-smi > /dev/null; then
    capped nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >> "$file" 2>&1 || rc=$?
  fi
  capped python - "$WORK/env.json" >> "$file" 2>&1 << 'EOF'
import datetime, importlib.metadata, importlib.util, json, os, platform, shutil, subprocess, sys


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def output(command):
    """The command's stdout, stripped; "" when it is missing or fails."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def last_line(command):
    return (output(command).splitlines() or ["not found" if shutil.which(command[0]) is None else "?"])[-1]


import torch

info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": os.environ["GPU_SESSION_MODE"], "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch cuda": torch.version.cuda, "triton": version("triton"),
        "opacus": version("opacus"), "nvcc": last_line(["nvcc", "--version"]), "ninja": last_line(["ninja", "--version"])}
commit, dirty = output(["git", "rev-parse", "--short", "HEAD"]), output(["git", "status", "--porcelain", "--untracked-files=no"])
info["git commit"] = (commit + (" (with uncommitted changes)" if dirty else "")) if commit else "unknown (no git checkout)"
info["FASTDP_AUTOTUNE_CONFIGS"] = os.environ.get("FASTDP_AUTOTUNE_CONFIGS") or "all configs"
for name in filter(None, os.environ.get("GPU_SESSION_WHEEL_NAMES", "").split(",")):
    info[f"carried wheel {name}"] = version(name)
if importlib.util.find_spec("fastdp.kernels") is None and os.path.isdir("kernels"):
    os.symlink("../kernels", "fastdp/kernels")  # what an install maps (setup.py's package_dir); ignored by git
    info["fastdp.kernels"] = "linked fastdp/kernels -> ../kernels (this checkout had no link, fastdp is not installed)"
else:
    spec = importlib.util.find_spec("fastdp.kernels")
    info["fastdp.kernels"] = spec.submodule_search_locations[0] if spec else "missing (no kernels/ folder)"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info["device"] = (f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                      f"{props.multi_processor_count} SMs")
else:
    info["device"] = "cpu (no CUDA)"
for key, value in info.items():
    print(f"{key}: {value}")
with open(sys.argv[1], "w") as handle:
    json.dump(info, handle, indent=1)
sys.exit(3 if not torch.cuda.is_available() and "dry run" not in info["mode"] else 0)
EOF
  local python_rc=$?
  if (( python_rc == 3 )); then NO_CUDA=1; return 3; fi
  (( python_rc )) && rc=$python_rc
  note "$(grep -m1 '^device: ' "$file" | cut -d' ' -f2-)"
  return $rc
}

stage_ext() {
  if (( ! HAVE_CUDA )); then STAGE_SKIPPED="no CUDA"; echo "skipped: no CUDA" > "$OUT/cuda_ext.txt"; return 0; fi
  local file="$OUT/cuda_ext.txt" rc=0
  echo "### python setup.py build_ext --inplace" > "$file"
  capped env MAX_JOBS="${MAX_JOBS:-$(nproc)}" FASTDP_BUILD_CUDA=1 python setup.py build_ext --inplace >> "$file" 2>&1 || rc=$?
  if python -c "import torch, fastdp._C" >> "$file" 2>&1; then
    note "fastdp._C built in place"
  else
    note "setup.py built no fastdp._C (the tests JIT-build it)"
    rc=1
  fi
  echo "### python -m pytest tests/test_cuda_extension.py" >> "$file"
  capped python -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda_extension.py >> "$file" 2>&1 || rc=$?
  note "$(pytest_result "$file")"
  return $rc
}

GPU_TEST_FILES=(tests/test_engine_triton_backend.py tests/test_graphed_step.py tests/test_rounding_bound.py)

stage_tests() {
  local file="$OUT/tests.txt" rc=0
  echo "### FASTDP_AUTOTUNE_CONFIGS=1 python -m pytest ${GPU_TEST_FILES[*]}" > "$file"
  capped env FASTDP_AUTOTUNE_CONFIGS=1 python -m pytest -q -p no:cacheprovider --tb=short "${GPU_TEST_FILES[@]}" >> "$file" 2>&1 || rc=$?
  note "$(pytest_result "$file")"
  return $rc
}

stage_steps() {
  local methods=${GPU_SESSION_METHODS:-nonprivate,fastdp-bk,fastdp-bk-per_layer,fastdp-bk-cudagraph}
  local models=${GPU_SESSION_MODELS:-mlp,resnet18,gpt2,lstm} rc=0 kept=() dropped=() method
  if [ -z "${GPU_SESSION_METHODS:-}" ]; then
    if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('opacus') is None)"; then
      methods+=",opacus-ghost,opacus-hooks"
    else
      note "opacus not importable (no wheel carried): no Opacus rows"
    fi
  fi
  local args=(--models "$models" --out "$WORK/steps" --steps 10 --warmup 3 --timeout 100)
  if (( ! HAVE_CUDA )); then
    IFS=, read -ra list <<< "$methods"
    for method in "${list[@]}"; do
      case "$method" in *cudagraph) dropped+=("$method") ;; *) kept+=("$method") ;; esac
    done
    methods=$(IFS=,; echo "${kept[*]}")
    (( ${#dropped[@]} )) && note "${dropped[*]} skipped: no CUDA"
    args=(--models "$models" --out "$WORK/steps" --quick --device cpu --jobs 2 --steps 2 --warmup 1 --timeout 120)
  fi
  capped python -m bench "${args[@]}" --methods "$methods" > "$WORK/steps.txt" 2>&1 || rc=$?
  cp "$WORK/steps/results.md" "$OUT/steps.md" 2> /dev/null
  if ! cp "$WORK/steps/results.json" "$OUT/steps.json" 2> /dev/null; then
    note "no results.json (bench's output: steps.txt in logs.tgz)"
    (( rc )) || rc=1
  fi
  return $rc
}

stage_kernels() {
  local file="$OUT/kernels.txt" rc=0 smoke=() script
  (( HAVE_CUDA )) || smoke=(--smoke)
  : > "$file"
  for script in "bench.bench_kernels_linear" "bench.bench_kernels_conv_embedding_norms" "bench.bench_kernels_linear --dtype bfloat16"; do
    echo "### python -m $script ${smoke[*]:-}" >> "$file"
    # shellcheck disable=SC2086  # $script is a module and its options
    capped python -m $script ${smoke[@]+"${smoke[@]}"} >> "$file" 2>&1 || rc=$?
    echo >> "$file"
  done
  return $rc
}

stage_finetune() {
  local rc=0 args=(--out "$WORK/finetune" --methods "${GPU_FINETUNE_METHODS:-nonprivate,fastdp-bk,fastdp-bk-per_layer,opacus-ghost}")
  [ -n "${GPU_FINETUNE_NONPRIVATE_LARGEST:-}" ] && args+=(--nonprivate-largest "$GPU_FINETUNE_NONPRIVATE_LARGEST")
  (( HAVE_CUDA )) || args+=(--quick)
  capped python -m bench.bench_largest_batch "${args[@]}" > "$OUT/finetune.txt" 2>&1 || rc=$?
  cp "$WORK/finetune/results.md" "$OUT/finetune.md" 2> /dev/null
  cp "$WORK/finetune/results.json" "$OUT/finetune.json" 2> /dev/null
  return $rc
}

# -- the session --------------------------------------------------------------------------------------
echo "gpu_session.sh: ${GPU_SESSION_MODE}, stages env${SELECTED% }; results in $OUT, scratch in $WORK"
run_stage env "${GPU_CAP_ENV:-20}"
if (( NO_CUDA )); then
  echo "gpu_session.sh: torch sees no CUDA device here; on a CPU machine run 'bash bench/gpu_session.sh all --dry-run'" >&2
  exit 2
fi
declare -A DEFAULT_CAPS=([ext]=100 [tests]=75 [steps]=205 [kernels]=75 [finetune]=540)
for stage in ext tests steps kernels finetune; do
  case "$SELECTED" in
    *" $stage "*)
      cap_variable="GPU_CAP_${stage^^}"
      run_stage "$stage" "${!cap_variable:-${DEFAULT_CAPS[$stage]}}" ;;
  esac
done

files=$(find "$OUT" -type f | wc -l)
(( files > 8 )) && echo "gpu_session.sh: $OUT holds $files files; the device tool returns at most 8 (clear it between runs)"
echo
cat "$OUT/summary.md"
exit $FAILED
