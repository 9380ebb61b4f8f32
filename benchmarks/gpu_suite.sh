#!/usr/bin/env bash
# The GPU checks and benchmarks, run from the repository root on a CUDA machine. Each stage runs
# under its own time limit; its log goes to $OUT/<stage>.log (JSON results beside it) and one
# summary line per stage to $OUT/summary.txt, printed at the end.
#   bash benchmarks/gpu_suite.sh tests     # the whole test suite, device=cuda where it applies
#   bash benchmarks/gpu_suite.sh engine    # GPU engine tests, batch-1 latency (+ gpt-fast beside it when
#                                          # its source is in .peers/gpt-fast), offline throughput
#   bash benchmarks/gpu_suite.sh kernels   # attention kernels against SDPA / cuDNN and the read ceiling
#   bash benchmarks/gpu_suite.sh quant     # quantized weights: GPU tests, kernel timings, batch-1 per mode
#                                          # (+ gpt-fast int8/int4), fp8 W8A8 throughput against bf16
#   bash benchmarks/gpu_suite.sh spec      # speculative decoding (docs/decoding.md): GPU tests, verification cost
#                                          # curve (Llama-3.1-8B shapes), train-heads, methods on SmolLM2
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
fs="python3 -m flashserve"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%-28s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$(tail -n 1 "$out/$name.log" | cut -c1-160)" \
    | tee -a "$out/summary.txt"
}

case "${1:-}" in
  tests)
    stage pytest 580 python3 -m pytest tests -q -p no:cacheprovider --timeout 600
    ;;
  engine)
    stage gpu-tests 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu_engine.py tests/test_gpu_e2e.py \
      tests/kernels/test_triton_backend.py -k "not smollm2"
    stage latency-llama8b 120 $fs bench latency --model llama-3.1-8b --load-format dummy \
      --output-json "$out/latency-llama8b.json"
    if [ -f .peers/gpt-fast/model.py ]; then
      stage gpt-fast-llama8b 200 python3 benchmarks/gpt_fast_peer.py --source .peers/gpt-fast \
        --output-json "$out/gpt-fast-llama8b.json"
    fi
    stage throughput-llama8b 130 $fs bench throughput --model llama-3.1-8b --load-format dummy \
      --output-json "$out/throughput-llama8b.json"
    stage throughput-qwen3 80 $fs bench throughput --model qwen3-0.6b --load-format dummy \
      --output-json "$out/throughput-qwen3.json"
    stage throughput-qwen3-serial 80 $fs bench throughput --model qwen3-0.6b --load-format dummy \
      --no-async-scheduling --output-json "$out/throughput-qwen3-serial.json"
    ;;
  kernels)
    stage kernels 300 $fs bench kernels --output-json "$out/kernels.json"
    ;;
  quant)  # quantized weights (docs/quantization.md): kernels vs references, kernel timings, batch-1 and throughput
    stage quant-tests 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_gemm.py \
      tests/kernels/test_quant_gguf_kernels.py tests/test_quant_gpu.py
    stage quant-kernels 240 $fs bench quant-kernels --gguf --output-json "$out/quant-kernels.json"
    for q in none int8 int4 fp8; do
      stage "latency-llama8b-$q" 170 $fs bench latency --model llama-3.1-8b --load-format dummy --quantization "$q" \
        --output-json "$out/latency-llama8b-$q.json"
    done
    if [ -f .peers/gpt-fast/model.py ]; then
      for q in int8 int4; do
        stage "gpt-fast-llama8b-$q" 200 python3 benchmarks/gpt_fast_peer.py --source .peers/gpt-fast --quant "$q" \
          --output-json "$out/gpt-fast-llama8b-$q.json"
      done
    fi
    for q in none fp8-w8a8; do
      stage "throughput-llama8b-$q" 170 $fs bench throughput --model llama-3.1-8b --load-format dummy \
        --quantization "$q" --output-json "$out/throughput-llama8b-$q.json"
    done
    ;;
  spec)  # speculative decoding (docs/decoding.md): tests, cost curve, heads trained here, per-method table
    stage spec-tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_spec_gpu.py tests/kernels/test_tree_attention.py
    stage spec-cost-llama8b 120 $fs bench decoding --cost-curve --model llama-3.1-8b --load-format dummy \
      --output-json "$out/spec-cost-llama8b.json"
    stage spec-train-heads 150 $fs train-heads --num-prompts 64 --max-tokens 128 --epochs 3 \
      --output "$out/smollm2-heads.safetensors"
    stage spec-smollm2 240 $fs bench decoding --methods ngram,layers-tree,heads,heads-tree \
      --heads "$out/smollm2-heads.safetensors" --output-json "$out/spec-smollm2.json"
    ;;
  *)
    echo "usage: $0 tests|engine|kernels|quant|spec" >&2
    exit 2
    ;;
esac
echo "---- summary ($out/summary.txt)"
cat "$out/summary.txt"
