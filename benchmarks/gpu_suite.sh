#!/usr/bin/env bash
# The GPU checks and benchmarks, run from the repository root on a CUDA machine.
#   bash benchmarks/gpu_suite.sh tests    # the whole test suite, device=cuda where it applies
#   bash benchmarks/gpu_suite.sh bench    # kernels, batch-1 latency, offline throughput
# Results (JSON, logs) go to $OUT (default ./gpu-results).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case "${1:-}" in
  tests)
    python3 -m pytest tests -q -p no:cacheprovider --timeout 600 2>&1 | tee "$out/pytest.log" | tail -40
    ;;
  bench)
    fs="python3 -m flashserve.cli"
    $fs bench kernels --output-json "$out/kernels.json" 2>&1 | tail -20
    $fs bench latency --model llama-3.1-8b --load-format dummy --output-json "$out/latency-llama8b.json" 2>&1 | tail -3
    $fs bench throughput --model qwen3-0.6b --load-format dummy --output-json "$out/throughput-qwen3.json" 2>&1 | tail -2
    $fs bench throughput --model llama-3.1-8b --load-format dummy --output-json "$out/throughput-llama8b.json" 2>&1 | tail -2
    ;;
  *)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac
