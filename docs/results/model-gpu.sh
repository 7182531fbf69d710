#!/usr/bin/env bash
# The real model's figures on one GPU (issue 12): the decode GEMV against stock F.linear, then the
# 7B shape at 16K through kvcore beside transformers' compiled generate, as JSON under $OUT.
#
#   OUT=/path/to/folder bash docs/results/model-gpu.sh [gemv|model|fused ...]   (default: gemv model)
#
# Run from the repository root on a CUDA host where torch, triton and transformers import.
#   gemv   python -m kvcore.triton_gemv: the 7B matrices (4096x4096, 11008x4096, 4096x11008,
#          32000x4096, each >= 1.5 GB of distinct copies) and the whole 7B chain in CUDA graphs,
#          weight GB/s of F.linear and of the split-K GEMV next to the copy bandwidth
#          -> $OUT/gemv.json (about 1 minute on an H200, mostly Triton's autotuning)
#   model  python -m kvcore.model_bench: Llama-2-7B shape, random float16 weights, 16,384 prompt
#          tokens, 64 new tokens x 5 repetitions, float16 and float8_e4m3fn caches in one process,
#          a torch.profiler breakdown of a decoded token (linear, attention, other, idle)
#          (transformers' compile paid once, ~45 s) -> $OUT/model-llama7b-<cache dtype>.json and
#          $OUT/model.jsonl (about 3 minutes on an H200)
#   fused  the same model with q/k/v and gate/up fused in kvcore (4 projections per layer instead of
#          7), float16 and float8_e4m3fn caches, no peer -> $OUT/fused/ (about 1.5 minutes)
set -euo pipefail

OUT=${OUT:?set OUT to a folder for the JSON}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(gemv model)

for phase in "${phases[@]}"; do
  case "$phase" in
    gemv)
      "$PYTHON" -m kvcore.triton_gemv --device cuda:0 --dtype float16 --json "$OUT/gemv.json" \
        2>&1 | tee "$OUT/gemv.log" ;;
    model)
      "$PYTHON" -m kvcore.model_bench --shape llama7b --weights-dtype float16 \
        --cache-dtype float16,float8_e4m3fn --context-length 16384 --new-tokens 64 --repetitions 5 \
        --peer compile --profile --device cuda:0 --out-dir "$OUT" --json "$OUT/model.jsonl" \
        2>&1 | tee "$OUT/model.log" ;;
    fused)
      "$PYTHON" -m kvcore.model_bench --shape llama7b --weights-dtype float16 \
        --cache-dtype float16,float8_e4m3fn --context-length 16384 --new-tokens 64 --repetitions 5 \
        --peer none --fuse-projections --profile --device cuda:0 --out-dir "$OUT/fused" \
        --json "$OUT/fused.jsonl" 2>&1 | tee "$OUT/fused.log" ;;
    *) echo "unknown phase $phase (gemv | model | fused)" >&2; exit 2 ;;
  esac
done
