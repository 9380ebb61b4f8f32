"""The ``flashserve`` command: generate, chat, serve, bench.

Subcommands other than generate and chat live in their own modules, each exposing
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used, so
``flashserve generate`` never imports the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module has add_arguments(parser) and run(args).
PLUGINS: dict[str, tuple[str, str]] = {
    "serve": ("flashserve.server.cli", "run the OpenAI-compatible HTTP server"),
    "compress": ("flashserve.compress.cli", "prune or factorise a model into a new model directory"),
    "distill": ("flashserve.compress.distill", "train a shallower student on a teacher's generated text"),
    "train-heads": ("flashserve.spec.train_heads", "train Medusa-style drafting heads on the model's own generations"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "kernels": ("flashserve.bench.kernels", "attention kernels vs torch SDPA and the read-bandwidth ceiling"),
    "latency": ("flashserve.bench.latency", "batch-1 decode tokens/s and bandwidth utilisation"),
    "throughput": ("flashserve.bench.throughput", "offline throughput on random requests"),
    "cpu-decode": ("flashserve.bench.cpu_decode", "decode speed vs transformers' generate on the same machine"),
    "serve": ("flashserve.bench.serve", "load an OpenAI-compatible endpoint; TTFT/TPOT/ITL percentiles"),
    "serve-sim": ("flashserve.bench.serve_sim", "replay a Poisson trace against the engine for each policy"),
    "structured": ("flashserve.bench.structured", "grammar-constrained (json_schema) decoding against plain, in process"),
    "quality": ("flashserve.bench.quality", "perplexity, KL and top-1 agreement of a lossy option against the exact model"),
    "decoding": ("flashserve.bench.decoding", "speculative decoding per method: acceptance length, speedup; verification cost"),
    "early-exit": ("flashserve.spec.early_exit_eval", "early exit per threshold on real text: quality against the full model, exits, work"),
    "quant-kernels": ("flashserve.bench.quant_kernels", "quantized matmuls vs dense (bf16 cuBLAS / CPU) and the read bandwidth"),
    "gemv": ("flashserve.bench.gemv", "batch-1 GEMV tiles of a model's products: the fixed rules' tile against every candidate"),
    "compress": ("flashserve.compress.speed", "2:4 and low-rank linears against dense: prefill and decode at real shapes"),
    "compress-quality": ("flashserve.compress.sweep", "quality of pruning and low rank at several ratios on real text"),
    "cascade": ("flashserve.compress.cascade_eval", "small-then-large cascade: share, agreement and compute saved per threshold"),
    "moe": ("flashserve.bench.moe", "fused MoE kernel vs a loop over experts, one layer of Qwen3-30B-A3B / Mixtral-8x7B"),
    "attention": ("flashserve.bench.attention", "decode attention and tok/s of windowed / selective attention (GPU)"),
    "disagg": ("flashserve.distributed.disagg_bench", "disaggregated prefill/decode: KV hand-off time per block, TTFT/TPOT vs colocated"),
    "attention-quality": ("flashserve.bench.attention_quality", "perplexity of each attention kind against its KV budget"),
    "lora": ("flashserve.bench.lora", "serving LoRA adapters against the base model: batch-1 decode and throughput"),
    "offload": ("flashserve.bench.offload", "decode tok/s with weights streamed from host memory, host KV-tier prefix hits"),
}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds an engine: one flag per EngineArgs field."""
    from flashserve.config import EngineArgs

    EngineArgs.add_cli_args(p)


def llm_kwargs(args: argparse.Namespace) -> dict:
    """The ``LLM(...)`` keywords the engine flags of ``args`` give."""
    from dataclasses import asdict

    from flashserve.config import EngineArgs

    return asdict(EngineArgs.from_cli(args))


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--lora", default=None, metavar="NAME", help="answer with this LoRA adapter (one of --lora-modules)")


def sampling_params(args: argparse.Namespace):
    from flashserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        lora=args.lora,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from flashserve.engine.llm import LLM

    params = sampling_params(args)
    llm = LLM(**llm_kwargs(args), verbose=not args.quiet)
    if args.chat_template:
        messages = [{"role": "user", "content": p} for p in args.prompt]
        outputs = llm.chat([[m] for m in messages], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1)
    for out in outputs:
        print(out.text if args.chat_template else (out.prompt or "") + out.text)
        if len(outputs) > 1:
            print("-" * 40)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: stream each reply as it is produced. /reset clears the history, /exit quits."""
    from flashserve.engine.llm import LLM

    params = sampling_params(args)
    llm = LLM(**llm_kwargs(args), verbose=not args.quiet)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = []
        try:
            for piece in llm.stream_chat(history, params):
                reply.append(piece)
                print(piece, end="", flush=True)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashserve", description="A small, fast LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one or more prompts")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat message")
    g.add_argument("--quiet", action="store_true")
    add_engine_arguments(g)
    add_sampling_arguments(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat that streams replies")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--quiet", action="store_true")
    add_engine_arguments(c)
    add_sampling_arguments(c)
    c.set_defaults(func=cmd_chat)

    # Plugins parse their own options (and -h), so their stub parsers take none.
    for name, (module, help_text) in PLUGINS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(plugin=module)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHES.items():
        p = bsub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(plugin=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    plugin = getattr(args, "plugin", None)
    if plugin is not None:
        # Plugins own their options: re-parse with the module's own arguments added.
        name = f"flashserve {args.command}" + (f" {args.bench}" if args.command == "bench" else "")
        module = importlib.import_module(plugin)
        p = argparse.ArgumentParser(prog=name, description=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        return int(module.run(p.parse_args(rest)) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"flashserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
