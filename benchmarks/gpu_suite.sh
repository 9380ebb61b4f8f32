#!/usr/bin/env bash
# The GPU checks and benchmarks, run from the repository root on a CUDA machine. Each stage runs
# under its own time limit; its log goes to $OUT/<stage>.log (JSON results beside it) and one
# summary line per stage to $OUT/summary.txt, printed at the end.
#   bash benchmarks/gpu_suite.sh tests     # the whole test suite, device=cuda where it applies
#   bash benchmarks/gpu_suite.sh engine    # GPU engine tests, batch-1 latency (+ gpt-fast beside it when
#                                          # its source is in .peers/gpt-fast), offline throughput
#   bash benchmarks/gpu_suite.sh kernels   # attention kernels against SDPA / cuDNN and the read ceiling
#   bash benchmarks/gpu_suite.sh quant     # quantized weights (~3 min): bf16 kernel tests, two modes end to
#                                          # end, kernel timings at M = 1, 16 against bf16 cuBLAS
#   bash benchmarks/gpu_suite.sh quant full  # (~15 min) all quant tests, kernel timings, batch-1 latency per
#                                          # mode (+ gpt-fast int8/int4), fp8 W8A8 throughput against bf16
#   bash benchmarks/gpu_suite.sh compress [distill]  # 2:4 / low-rank tests and speed; [SmolLM2 quality table, students, cascade]
#   bash benchmarks/gpu_suite.sh compress gemma GGUF  # Gemma 3 270M students (white 9 and 4 layers, black 9)
#   bash benchmarks/gpu_suite.sh server    # grammar masks on the GPU (tests) and structured-output cost
#                                          # against plain decoding (needs the llguidance wheel: docs/server.md)
#   bash benchmarks/gpu_suite.sh moe       # MoE (docs/moe.md): new GPU tests, launch sweep, fused kernel vs expert
#                                          # loop for bf16 / int8 / fp8 experts (<= 150 s)
#   bash benchmarks/gpu_suite.sh moe-e2e   # MoE batch-1 decode (bf16, fp8 experts) and throughput of dummy
#                                          # Qwen3-30B-A3B and Mixtral-8x7B (~12 min)
#   bash benchmarks/gpu_suite.sh attn      # windowed / Quest attention: kernel tests at full size, decode attention
#                                          # and end-to-end tok/s at 32k (Llama-3.1-8B shapes) against full attention
#   bash benchmarks/gpu_suite.sh spec [gemma GGUF]  # speculative decoding (docs/decoding.md): GPU tests, verification cost
#                                          # curve (Llama-3.1-8B shapes), train-heads, methods on SmolLM2 (or on Gemma 3)
#   bash benchmarks/gpu_suite.sh dist      # distributed: NCCL tests (2+ GPUs), process boundary at world size 1
#   bash benchmarks/gpu_suite.sh disagg    # disaggregated prefill/decode on one GPU: tokens, KV hand-off per block,
#                                          # TTFT/TPOT against the colocated engine (Llama-3.1-8B dummy weights)
#   bash benchmarks/gpu_suite.sh serve DIR # bench serve 200/200 against flashserve serve on dummy weights of DIR
#   bash benchmarks/gpu_suite.sh offload   # weights streamed from host (25/50/75% of Llama-3.1-8B) and host KV-tier
#                                          # prefix hits, against the pinned copy bandwidth (docs/distributed.md)
#   bash benchmarks/gpu_suite.sh lora      # LoRA adapters: GPU tests against PEFT, 4 adapters' cost (docs/lora.md)
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
  dist)  # docs/distributed.md: NCCL tensor/pipeline tests (skip on one GPU), Worker in-process vs another process
    stage dist-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_distributed_gpu.py -rs
    for ex in inproc process; do
      stage "dist-latency-qwen3-$ex" 60 $fs bench latency --model qwen3-0.6b --load-format dummy --executor "$ex" \
        --output-json "$out/dist-latency-qwen3-$ex.json"
    done
    ;;
  kernels)
    stage kernels 300 $fs bench kernels --output-json "$out/kernels.json"
    ;;
  quant)  # quantized weights (docs/quantization.md). ~3 min: bf16 kernels vs references, two modes end to end,
    # kernel timings at M = 1 and 16. `quant full` (~15 min) adds every dtype and mode, M = 4 and 2048,
    # batch-1 latency per mode (+ gpt-fast int8/int4) and fp8 W8A8 throughput against bf16.
    if [ "${2:-}" = full ]; then
      stage quant-tests 420 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_gemm.py \
        tests/kernels/test_quant_gguf_kernels.py tests/test_quant_gpu.py
      stage quant-kernels 300 $fs bench quant-kernels --gguf --output-json "$out/quant-kernels.json"
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
    else
      stage quant-tests 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_gemm.py \
        tests/kernels/test_quant_gguf_kernels.py tests/test_quant_gpu.py \
        -k "bfloat16 or llama_shape or exact or rejects or decode_like_the_reference and (int4-g32 or w8a8) or mixed_types"
      stage quant-kernels 90 $fs bench quant-kernels --gguf --m 1,16 --warmup-ms 10 --rep-ms 50 \
        --output-json "$out/quant-kernels.json"
    fi
    ;;
  compress)  # docs/compression.md: `compress` = 2:4 / low-rank GPU tests and speed at Llama-3.1-8B shapes (~2.5 min);
             # `compress distill` = SmolLM2 quality table, students of 15 and 7 of 30 layers, white and black box (~20 min)
             # `compress gemma GGUF` = Gemma 3 270M students; needs transformers 5.24 (5.17 converts its tokenizer wrongly; 5.25 wants huggingface-hub >= 2.4, the machine has 1.33)
    if [ "${2:-speed}" = distill ]; then
      d="$out/distill"
      mkdir -p "$d"
      stage compress-quality 400 $fs bench compress-quality --output-json "$out/compress-quality.json"
      for m in white black; do
        for n in 15 7; do
          stage "distill-$m-$n" 240 $fs distill --layers "$n" --mode "$m" --samples 2048 --gen-tokens 192 --steps 100 --eval-every 50 \
            --data "$d/teacher-text.json" --output "$d/student-$m-$n" --output-json "$out/distill-$m-$n.json"
        done
      done
      stage cascade 120 $fs bench cascade --small "$d/student-white-15" --output-json "$out/cascade.json"
    elif [ "${2:-}" = gemma ]; then  # $3: the Gemma 3 270M GGUF; students of 9 and 4 of 18 layers (~4 min)
      g=${3:?"usage: $0 compress gemma GGUF"}
      d="$out/distill-gemma"
      mkdir -p "$d"
      for mn in white-9 white-4 black-9; do
        stage "distill-gemma-$mn" 270 $fs distill --model "$g" --layers "${mn#*-}" --mode "${mn%-*}" --samples 2048 \
          --gen-tokens 192 --steps 100 --eval-every 50 --batch-tokens 8192 --data "$d/teacher-text.json" \
          --output "$d/student-$mn" --output-json "$out/distill-gemma-$mn.json"
      done
    else
      stage compress-tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_compress_layers.py
      stage compress-speed 200 $fs bench compress --output-json "$out/compress-speed.json"
    fi
    ;;
  server)  # structured output (docs/server.md): grammar masks in the overlapped GPU loop, then their cost
    stage server-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_logits_processors.py
    stage structured-smollm2 150 $fs bench structured --device cuda --concurrency 1 64 --output-len 256 \
      --output-json "$out/structured-smollm2.json"
    ;;
  moe)  # mixture of experts (docs/moe.md), <= 150 s: the new GPU tests (the tests stage runs them all), then the
         # launch sweep (best config per shape) and the fused-vs-loop table for bf16 / int8 / fp8 experts, short table last
    stage moe-tests 50 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py tests/test_moe_gpu.py \
      -k "quantized or route or elsewhere or layer_triton"
    stage moe-kernel 100 $fs bench moe --sweep --tokens 1,4,256 --output-json "$out/moe-kernel.json"
    ;;
  moe-e2e)  # MoE end to end (~12 min): batch-1 decode over active bytes (bf16 and fp8 experts) and the
            # 256-request throughput, dummy Qwen3-30B-A3B (61 GB) and Mixtral-8x7B (93 GB)
    for m in qwen3-30b-a3b mixtral-8x7b; do
      for q in none fp8; do
        stage "latency-$m-$q" 150 $fs bench latency --model "$m" --load-format dummy --max-model-len 1024 \
          --new-tokens 128 --repeats 2 --quantization "$q" --output-json "$out/latency-$m-$q.json"
      done
      stage "throughput-$m" 150 $fs bench throughput --model "$m" --load-format dummy \
        --output-json "$out/throughput-$m.json"
    done
    ;;
  attn)  # docs/attention.md: window / sinks / Quest in the Triton kernels, then the 32k decode table
    stage attn-tests 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_window_kernels.py \
      tests/kernels/test_attention_sparse_kinds.py tests/kernels/test_attention_request_option_kernels.py \
      tests/test_attention_gpu.py
    stage attn-bench 150 $fs bench attention --output-json "$out/attention.json"
    ;;
  spec)  # speculative decoding (docs/decoding.md): tests, cost curve, heads trained here, per-method table;
         # `spec gemma GGUF`: the method table on the Gemma 3 270M GGUF (needs transformers 5.24 for its tokenizer, as above)
    if [ "${2:-}" = gemma ]; then
      g=${3:?"usage: $0 spec gemma GGUF"}
      stage spec-gemma3 300 $fs bench decoding --model "$g" --methods ngram,ngram-tree,layers --batch-sizes 1,16 \
        --num-prompts 16 --batch1-prompts 4 --new-tokens 96 --output-json "$out/spec-gemma3.json"
    else
      stage spec-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_spec_gpu.py tests/kernels/test_tree_attention.py
      stage spec-cost-llama8b 120 $fs bench decoding --cost-curve --model llama-3.1-8b --load-format dummy \
        --output-json "$out/spec-cost-llama8b.json"
      stage spec-train-heads 150 $fs train-heads --num-prompts 64 --max-tokens 128 --epochs 3 \
        --output "$out/smollm2-heads.safetensors"
      stage spec-smollm2 240 $fs bench decoding --methods ngram,layers-tree,heads,heads-tree \
        --heads "$out/smollm2-heads.safetensors" --output-json "$out/spec-smollm2.json"
    fi
    ;;
  disagg)  # docs/distributed.md: disaggregated prefill/decode, two processes on one GPU (~2.5 min): tokens against
           # one GPU, then KV hand-off time per block at Llama-3.1-8B shapes (host-staged gloo on one GPU, NCCL
           # when there are two) and TTFT/TPOT of 32 requests against the colocated engine (dummy weights)
    stage disagg-tests 40 python3 -m pytest -q -p no:cacheprovider tests/test_distributed_disagg_gpu.py -rs
    stage disagg-bench 120 $fs bench disagg --model llama-3.1-8b --load-format dummy --max-model-len 2048 \
      --kv-cache-bytes $((16 << 30)) --blocks 1,16,64,256 --requests 32 --prompt-len 512 --new-tokens 64 \
      --output-json "$out/disagg.json"
    ;;
  serve)  # issue 8's serving targets: flashserve serve on dummy weights, then bench serve 200/200 at 10, 45 and
           # unbounded req/s, 900 requests at 45 and 55 req/s, then bench throughput --stream of the same shapes (the
           # engine thread alone). $2: a folder with config.json and tokenizer files whose vocabulary matches the config
           # (e.g. Llama-3.1-8B's config with vocab_size 49152 beside SmolLM2's tokenizer). The GPU machine needs
           # the server wheels (fastapi, starlette, uvicorn, pydantic, pydantic-core, opentelemetry-api, ...) on PYTHONPATH.
    dir=${2:?"usage: $0 serve MODEL_DIR (config.json + tokenizer files; the weights are drawn at random)"}
    python3 -m flashserve serve --model "$dir" --load-format dummy --port 8011 > "$out/server.log" 2>&1 &
    server=$!
    for _ in $(seq 1 240); do  # until healthy, or the server has exited (its log says why)
      curl -sf http://127.0.0.1:8011/health > /dev/null && break; kill -0 "$server" 2> /dev/null || break; sleep 1
    done
    stage bench-serve 240 $fs bench serve --base-url http://127.0.0.1:8011/v1 --prompt-token-ids \
      --input-len 200 --output-len 200 --num-prompts 200 --request-rate 10 45 inf \
      --output-json "$out/serve.json" --plot "$out/serve.png"
    # held for 20 s: does the queue stay flat at 45 req/s (TTFT bounded), and where does it start to grow
    stage bench-serve-sustained 120 $fs bench serve --base-url http://127.0.0.1:8011/v1 --prompt-token-ids \
      --input-len 200 --output-len 200 --num-prompts 900 --request-rate 45 55 --output-json "$out/serve-sustained.json"
    kill "$server"
    wait "$server" 2> /dev/null
    # the engine thread's side without HTTP: every request streamed with delta outputs, host time by phase
    stage throughput-stream 150 $fs bench throughput --model "$dir" --load-format dummy --num-requests 200 \
      --min-len 200 --max-len 200 --stream --output-json "$out/throughput-stream.json"
    ;;
  lora)  # docs/lora.md: the GPU tests against PEFT, then 4 adapters' cost against the base engine (~2 min)
    stage lora-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_lora_gpu.py
    stage lora-qwen3 120 $fs bench lora --num-requests 64 --output-json "$out/lora-qwen3.json"
    ;;
  offload)  # docs/distributed.md "Offloading": GPU tests (graphs and eager), then the 8B table (~2 min)
    stage offload-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_offload_gpu.py
    stage offload-llama8b 150 $fs bench offload --output-json "$out/offload-llama8b.json"
    ;;
  *)
    echo "usage: $0 tests|engine|kernels|quant|compress|server|moe|moe-e2e|attn|spec|dist|serve|offload|disagg|lora [...]" >&2
    exit 2
    ;;
esac
echo "---- summary ($out/summary.txt)"
cat "$out/summary.txt"
