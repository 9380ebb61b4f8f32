"""Batch-1 decode speed of gpt-fast (pytorch-labs/gpt-fast) on the same GPU, as a same-run peer.

gpt-fast is not part of flashserve and is never committed: fetch its source into an ignored
folder (``.peers/gpt-fast``) and point ``--source`` at it. Its Transformer is built with random
bf16 weights (N(0, 0.02), the same shapes as flashserve's dummy Llama-3.1-8B), optionally
converted with its own int8 / int4 weight-only handlers, its decode step compiled the way its
generate.py does (``torch.compile(mode="reduce-overhead", fullgraph=True)``), and timed over
``--new-tokens`` greedy tokens after a warm-up that includes the compilation.

    python benchmarks/gpt_fast_peer.py --source .peers/gpt-fast --quant none --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="folder holding gpt-fast's model.py and quantize.py")
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    sys.path.insert(0, args.source)
    import generate as gf  # gpt-fast's own decode step and sampling
    from model import Transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer.from_name(args.model).to(torch.bfloat16)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.02)
    if args.quant == "int8":
        from quantize import WeightOnlyInt8QuantHandler

        handler = WeightOnlyInt8QuantHandler(model)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
    elif args.quant == "int4":
        from quantize import WeightOnlyInt4QuantHandler

        handler = WeightOnlyInt4QuantHandler(model, groupsize=128)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
    model = model.cuda().eval()
    max_len = args.prompt_len + args.new_tokens + 8
    with torch.device("cuda"):
        model.setup_caches(max_batch_size=1, max_seq_length=max_len)
    decode = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(100, 30000, (1, args.prompt_len), device="cuda")

    def run(n: int) -> float:
        with torch.no_grad():
            pos = torch.arange(args.prompt_len, device="cuda")
            token = gf.prefill(model, prompt, pos)
            pos = torch.tensor([args.prompt_len], device="cuda", dtype=torch.int)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n):
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    token, _ = decode(model, token.view(1, -1), pos)
                pos += 1
                token = token.clone()
            torch.cuda.synchronize()
            return time.perf_counter() - start

    t0 = time.perf_counter()
    run(8)  # compiles and captures
    run(8)
    compile_s = time.perf_counter() - t0
    elapsed = min(run(args.new_tokens) for _ in range(2))
    res = {"peer": "gpt-fast", "model": args.model, "quant": args.quant, "new_tokens": args.new_tokens,
           "decode_tok_s": args.new_tokens / elapsed, "compile_s": compile_s,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"gpt-fast {args.model} {args.quant}: {res['decode_tok_s']:.1f} tok/s batch 1 "
          f"(compile + warm-up {compile_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
