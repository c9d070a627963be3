#!/usr/bin/env bash
# Everything fastdp needs a GPU for, in as few device calls as possible (each call ≤ 10 min).
#
#   bash bench/gpu_session.sh check   # build the CUDA extension (JIT), GPU tests of csrc/ and Triton kernels
#   bash bench/gpu_session.sh kernels # per-kernel benchmarks vs cuBLAS/cuDNN and materialise-then-norm
#   bash bench/gpu_session.sh steps MODELS   # whole-step table for a comma list of bench models
#   bash bench/gpu_session.sh finetune [METHODS [NONPRIVATE_LARGEST]]
#                                     # GPT-2-medium bf16: largest batch per method, throughput there
#
# Runs from the repository root on the device machine (torch with CUDA, triton, nvcc, ninja; no
# internet, so nothing is pip-installed: the checkout is used through PYTHONPATH). Writes logs and
# results under $OUT (default ./gpu-out), which the device tool copies back; commit what you keep
# under bench/results/ with the device, date and command.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fastdp-torch-ext}
unset TRITON_INTERPRET FASTDP_BACKEND

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1

case "${1:-check}" in
  check)
    python -m pytest -q -x tests/test_cuda_extension.py 2>&1 | tail -30 > "$OUT/cuda_extension.txt"
    python -m pytest -q tests/test_kernels_linear.py tests/test_kernels_noise.py tests/test_kernels_conv.py \
      tests/test_kernels_embedding.py tests/test_kernels_norms.py tests/test_engine_triton_backend.py \
      tests/test_dp_layers.py tests/test_rules_rnn.py tests/test_graphed_step.py tests/test_compile.py 2>&1 | tail -40 > "$OUT/gpu_tests.txt"
    ;;
  kernels)
    python -m bench.bench_kernels_linear > "$OUT/kernels_linear.txt" 2>&1
    python -m bench.bench_kernels_linear --dtype bfloat16 >> "$OUT/kernels_linear.txt" 2>&1
    python -m bench.bench_kernels_conv_embedding_norms > "$OUT/kernels_conv_emb_norms.txt" 2>&1
    ;;
  steps)
    python -m bench --models "${2:-mlp,resnet18,gpt2}" --out /tmp/fastdp-steps > "$OUT/steps.txt" 2>&1
    # the device tool returns at most 8 files: the tables, and the per-process logs in one archive
    cp /tmp/fastdp-steps/results.* "$OUT/" && tar -czf "$OUT/step-logs.tgz" -C /tmp/fastdp-steps logs
    ;;
  finetune)
    # one process per probe: may pass 10 min for all four methods; split with METHODS and, in the
    # later call, non-private's largest batch from the first (then it is timed, not searched)
    args=(--out /tmp/fastdp-finetune --methods "${2:-nonprivate,fastdp-bk,fastdp-bk-per_layer,opacus-ghost}")
    [ -n "${3:-}" ] && args+=(--nonprivate-largest "$3")
    # SIGINT before the device tool's limit: the run stops its child process and the files below are copied
    timeout -s INT 560 python -m bench.bench_largest_batch "${args[@]}" > "$OUT/finetune.txt" 2>&1
    cp /tmp/fastdp-finetune/results.json "$OUT/finetune-results.json"
    cp /tmp/fastdp-finetune/results.md "$OUT/finetune-results.md"
    tar -czf "$OUT/finetune-logs.tgz" -C /tmp/fastdp-finetune logs
    ;;
  *)
    echo "usage: $0 check|kernels|steps [models]|finetune [methods [nonprivate-largest]]" >&2; exit 2 ;;
esac
cat "$OUT"/*.txt 2>/dev/null | tail -60
