"""``flashserve bench decoding``: speculative decoding per method, and the verification cost curve.

Default mode, on real weights (default: the embedded SmolLM2-135M-Instruct): for each method
(plain decoding, then n-gram, the target's first layers, trained heads, a draft model; chains and
token trees) and each batch size, greedy generation over the fixed prompt sets
(``flashserve.spec.prompts``: chat, summarize, code; through the model's chat template, or as plain
text with the tokenizer's BOS for a base model without one, e.g. Gemma 3 270M: ``bench_prompts``).
Per cell: acceptance length (tokens per verification step, from the engine's ``SpecStats``),
drafts per verification step (below k where the proposer found fewer or ``adapt_length`` chose a
shorter chain), decode tokens/s, the speedup over plain decoding in the same run, the share of
outputs identical to plain decoding's (speculation is lossless: expect 100 %, up to float ties
under a different batch shape on GPU), and how much of plain decoding's output repeats itself
(``loop_share``: prompt lookup copies a model's loops,
so a cell whose outputs loop measures loop copying, not the prompt kind's text). Before its
timed cells, each method's engine generates from prompts outside the measured set
(``training_prompts``) at every batch size: the kernels, CUDA graphs and draft paths a method
hits compile there, and the off-switch starts from the measured history a serving engine has,
not from nothing. The methods' engines live side by side (each with an equal share of the KV
memory unless a size is given) and take turns within each run of a cell, so that a machine whose
speed drifts during the table slows every method alike.

``--cost-curve``, on dummy weights (default: Llama-3.1-8B shapes): the time of one target pass
over B sequences at context C where each sequence brings n = 1 + k tokens (a chain of k drafts,
causal) or a token tree of n nodes (tree-masked attention), next to a plain decode step (n = 1).
The speedup of any measured acceptance length L at k drafts reads off as
``L * t(1) / (t(1 + k) + drafting time)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from flashserve.bench import cpu_model
from flashserve.cli import add_engine_arguments, llm_kwargs
from flashserve.runner.kv_cache import DEFAULT_CPU_FRACTION, DEFAULT_GPU_FRACTION
from flashserve.runner.worker import resolve_device

METHODS = {  # name -> speculative_config without k (None: plain decoding)
    "none": None,
    "ngram": {"method": "ngram"},
    "ngram-adapt": {"method": "ngram", "adapt_length": True},  # each request's chain length chosen
    "ngram-tree": {"method": "ngram", "tree_width": 2},
    "layers": {"method": "layers"},
    "layers-tree": {"method": "layers", "tree_width": 2},
    "heads": {"method": "heads"},
    "heads-tree": {"method": "heads", "tree_width": 2},
    "draft": {"method": "draft"},
    "draft-tree": {"method": "draft", "tree_width": 2},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.set_defaults(max_model_len=2048, max_num_seqs=16)
    p.add_argument("--methods", default="none,ngram,layers,layers-tree",
                   help=f"comma-separated, from {', '.join(METHODS)} (none = plain decoding, always included)")
    p.add_argument("--num-spec-tokens", type=int, default=4, help="k: drafts per step (trees: 2k nodes, width 2)")
    p.add_argument("--heads", default=None, help="heads file of `flashserve train-heads` (methods heads*)")
    p.add_argument("--draft-model", default=None, help="draft model folder or .gguf (methods draft*)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--kinds", default="chat,summarize,code")
    p.add_argument("--num-prompts", type=int, default=16, help="prompts per kind (batch 1 runs the first few)")
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts per kind at batch 1")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--cell-runs", type=int, default=1,
                   help="generations of each cell's prompts: tok/s is their median (batch-1 cells are short and "
                        "noisy); acceptance and off-switch counts cover every run")
    p.add_argument("--no-off-switch", action="store_true", help="speculate on every step (disable_by_cost off)")
    p.add_argument("--spec-options", default=None,
                   help='JSON merged into every method\'s speculative_config, e.g. \'{"prompt_lookup_min": 2}\'')
    p.add_argument("--cost-curve", action="store_true", help="verification-step cost vs tokens per step instead")
    p.add_argument("--context", type=int, default=1024, help="cost curve: context length per sequence")
    p.add_argument("--cost-batch-sizes", default="1,16", help="cost curve: sequences per step")
    p.add_argument("--chain-ks", default="1,2,3,4,5,6,7,8", help="cost curve: drafts per chain")
    p.add_argument("--tree-sizes", default="4,8,16,32,64", help="cost curve: tree nodes (root included)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output-json", default=None)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def spec_config(method: str, k: int, heads: str | None, draft: str | None, off_switch: bool,
                options: str | None = None) -> dict | None:
    """The ``speculative_config`` of a bench method (trees get 2k nodes at width 2), with the
    keys of ``options`` (a JSON object) on top."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    base = METHODS[method]
    if base is None:
        return None
    cfg = {**base, "num_speculative_tokens": 2 * k if base.get("tree_width", 1) > 1 else k,
           "disable_by_cost": off_switch}
    if cfg["method"] == "heads" and heads:
        cfg["heads"] = heads
    if cfg["method"] == "draft":
        if not draft:
            raise ValueError(f"method {method!r} needs --draft-model (a model with the target's vocabulary)")
        cfg["model"] = draft
    if options:
        extra = json.loads(options)
        if not isinstance(extra, dict):
            raise ValueError(f"--spec-options must be a JSON object, got {options!r}")
        cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------- acceptance / speedup
LOOP_NGRAM = 8


def loop_share(outputs: list[list[int]], n: int = LOOP_NGRAM) -> float:
    """Share of the outputs' tokens (from each output's n-th on) that end an n-gram already seen
    earlier in the same output: 0 for text that never repeats itself, near 1 for a degenerate
    loop, which n-gram drafts copy at high acceptance whatever the prompt asked."""
    repeated = total = 0
    for ids in outputs:
        seen: set[tuple[int, ...]] = set()
        for i in range(n, len(ids) + 1):
            gram = tuple(ids[i - n : i])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def bench_prompts(engine, texts: list[str]) -> tuple[list[str], bool]:
    """The prompts as the bench sends them, and whether the tokenizer adds its special tokens:
    through the model's chat template, which writes them itself (False), or plain text for a base
    model without one, with its BOS as in training (True: without BOS, Gemma 3 270M answers the
    chat and code prompts with loops, 98% / 96% of tokens repeating an 8-gram, against 73% / 38%
    with it; CPU, greedy, 96 tokens)."""
    if getattr(engine.tokenizer, "chat_template", None):
        return [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts], False
    return list(texts), True


def _run_cells(llms: dict, prompts: dict[str, list[str]], batch_sizes: list[int], b1_prompts: int, new_tokens: int,
               runs: int = 1, special: bool = False) -> tuple[dict, dict]:
    """Per method and (kind, batch): decode tokens/s (the median of ``runs`` generations of the
    cell's prompts, every run's kept), acceptance length (over all runs) and the first run's token
    ids; and the seconds each method spent. The methods take turns within each run of a cell, so
    a machine that slows down or speeds up over the minutes a table takes (a shared host, clocks)
    moves every method's figures alike, not only the later methods'. ``special``: the tokenizer
    adds its special tokens (``bench_prompts``)."""
    from flashserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    cells: dict[str, dict] = {m: {} for m in llms}
    spent = dict.fromkeys(llms, 0.0)
    for kind, texts in prompts.items():
        for b in batch_sizes:
            use = texts[:b1_prompts] if b == 1 else texts
            before = {m: llm.engine.stats().spec for m, llm in llms.items()}
            rates: dict[str, list[float]] = {m: [] for m in llms}
            ids: dict[str, list] = {m: [] for m in llms}
            for run in range(runs):
                for m, llm in llms.items():
                    seconds, tokens = 0.0, 0
                    for i in range(0, len(use), b):
                        t0 = time.perf_counter()
                        outs = llm.generate(use[i : i + b], params, use_tqdm=False, add_special_tokens=special)
                        seconds += time.perf_counter() - t0
                        for o in outs:
                            if run == 0:
                                ids[m].append(list(o.outputs[0].token_ids))
                            tokens += len(o.outputs[0].token_ids)
                    rates[m].append(tokens / seconds)
                    spent[m] += seconds
            for m, llm in llms.items():
                cell = {"tokens_per_s": statistics.median(rates[m]), "runs_tokens_per_s": rates[m], "ids": ids[m]}
                after, was = llm.engine.stats().spec, before[m]
                if after is not None:
                    steps = after.num_steps - (was.num_steps if was else 0)
                    acc = after.num_accepted_tokens - (was.num_accepted_tokens if was else 0)
                    drafts = after.num_draft_tokens - (was.num_draft_tokens if was else 0)
                    cell.update(acceptance_length=(acc + steps) / steps if steps else 0.0, verify_steps=steps,
                                drafts=drafts, accepted=acc,
                                switched_off=after.num_switched_off - (was.num_switched_off if was else 0))
                cells[m][(kind, b)] = cell
    return cells, spent


def _warm_up(llm, prompts: list[str], batch_sizes: list[int], new_tokens: int, special: bool = False) -> None:
    """Untimed generation at every batch size from prompts outside the measured set (three at
    batch 1: one per kind, as ``training_prompts`` mixes them)."""
    from flashserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for b in batch_sizes:
        for i in range(0, 3 if b == 1 else b, b):
            llm.generate(prompts[i : i + b], params, use_tqdm=False, add_special_tokens=special)


def run_methods(args: argparse.Namespace) -> dict:
    from flashserve import LLM
    from flashserve.config import SpeculativeConfig
    from flashserve.spec.prompts import eval_prompts, training_prompts

    methods = [m for m in args.methods.split(",") if m]
    if "none" in methods:
        methods.remove("none")
    methods = ["none", *methods]
    if args.cell_runs < 1:
        raise ValueError(f"--cell-runs must be >= 1, got {args.cell_runs}")
    configs = {m: spec_config(m, args.num_spec_tokens, args.heads, args.draft_model, not args.no_off_switch,
                              args.spec_options) for m in methods}  # bad input fails before any model loads
    for cfg in configs.values():
        if cfg is not None:
            SpeculativeConfig.parse(cfg)
    batch_sizes = _ints(args.batch_sizes)
    kinds = [k for k in args.kinds.split(",") if k]
    base = llm_kwargs(args)
    base["verbose"] = False
    llms = {}
    try:
        for i, m in enumerate(methods):  # every method's engine at once, so that they take turns
            kw = {**base, "speculative_config": configs[m]}
            if kw.get("kv_cache_bytes") is None and kw.get("kv_cache_memory_fraction") is None:
                # about an equal share of the memory the first engine found free
                cuda = resolve_device(kw.get("device") or "auto").type == "cuda"
                default = DEFAULT_GPU_FRACTION if cuda else DEFAULT_CPU_FRACTION
                kw["kv_cache_memory_fraction"] = default / (len(methods) - i)
            llm = llms[m] = LLM(**kw)
            if i == 0:  # the same prompts for every method
                prompts = {k: bench_prompts(llm.engine, eval_prompts(k, args.num_prompts))[0] for k in kinds}
                warm, special = bench_prompts(llm.engine, training_prompts(max(3, max(batch_sizes))))
            llm.engine.warm_up()
            _warm_up(llm, warm, batch_sizes, args.new_tokens, special)
        results, spent = _run_cells(llms, prompts, batch_sizes, args.batch1_prompts, args.new_tokens,
                                    args.cell_runs, special)
        device = str(llms["none"].engine.device)
    finally:
        for llm in llms.values():
            llm.engine.shutdown()
    for m in methods:
        print(f"# {m}: {spent[m]:.1f} s", flush=True)
    cpu = cpu_model() if device == "cpu" else None
    rows = []
    for m in methods:
        for (kind, b), cell in results[m].items():
            ref = results["none"][(kind, b)]
            same = sum(x == y for x, y in zip(cell["ids"], ref["ids"])) / max(1, len(ref["ids"]))
            rows.append({"method": m, "kind": kind, "batch": b, "tokens_per_s": round(cell["tokens_per_s"], 2),
                         "runs_tokens_per_s": [round(x, 2) for x in cell["runs_tokens_per_s"]],
                         "speedup": round(cell["tokens_per_s"] / ref["tokens_per_s"], 3),
                         "acceptance_length": round(cell.get("acceptance_length", 1.0), 3),
                         "drafts_per_step": round(cell.get("drafts", 0) / max(1, cell.get("verify_steps", 0)), 2),
                         "verify_steps": cell.get("verify_steps", 0), "switched_off": cell.get("switched_off", 0),
                         "identical": round(same, 3), "loops": round(loop_share(ref["ids"]), 3)})
    return {"device": device, "cpu": cpu, "k": args.num_spec_tokens, "new_tokens": args.new_tokens,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def print_methods(res: dict) -> None:
    print(f"device {res['device']}{' (' + res['cpu'] + ')' if res['cpu'] else ''}, k = {res['k']}, "
          f"{res['new_tokens']} new tokens, greedy, {res['date']}")
    print(f"{'method':<12} {'kind':<10} {'batch':>5} {'tok/s':>9} {'speedup':>8} {'accept':>7} {'drafts':>6} {'off':>4}"
          f" {'same':>5}"
          f" {'loops':>5}  speedup (| = 1x)")
    for r in res["rows"]:
        print(f"{r['method']:<12} {r['kind']:<10} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['acceptance_length']:>7.2f} {r['drafts_per_step']:>6.2f} {r['switched_off']:>4} "
              f"{r['identical'] * 100:>4.0f}% "
              f"{r['loops'] * 100:>4.0f}%  {_bar(r['speedup'])}")


def _bar(x: float, per_unit: int = 20, width: int = 80) -> str:
    """A text bar of ``x`` (per_unit characters per 1.0) with a mark at 1.0: the table's plot."""
    n = min(width, round(x * per_unit))
    bar = ["#"] * n + [" "] * max(0, per_unit + 1 - n)
    bar[per_unit] = "|" if n <= per_unit else "+"
    return "".join(bar).rstrip()


# ---------------------------------------------------------------------------- verification cost curve
def _heap_tree(n: int):
    """A binary token tree of ``n`` nodes (node i's parent: (i - 1) // 2): wide, like top-2 branching."""
    from flashserve.spec.tree import TokenTree

    return TokenTree(tuple(range(n)), tuple([-1] + [(i - 1) // 2 for i in range(1, n)]))


def _time_step(worker, runner, vocab: int, batch: int, n: int, context: int, tree, repeats: int) -> float:
    """Median seconds of one forward + LM head over ``batch`` sequences of ``n`` new tokens after
    ``context`` cached ones (garbage K/V: the cost does not depend on values)."""
    from flashserve.kernels.tree_mask import TreeMask

    dev = worker.device
    bs = worker.block_size
    seq = context + n
    blocks_per = -(-seq // bs)
    table = torch.arange(batch * blocks_per, dtype=torch.int32, device=dev).view(batch, blocks_per)
    block_table = torch.zeros((batch, runner.buffers.block_tables.shape[1]), dtype=torch.int32, device=dev)
    block_table[:, :blocks_per] = table
    pos = np.tile(np.arange(context, seq, dtype=np.int64), batch)
    rows = np.repeat(np.arange(batch, dtype=np.int64), n)
    blk = table.cpu().numpy()[rows, pos // bs].astype(np.int64)
    slot_map = blk * bs + pos % bs
    qlens = np.full(batch, n, dtype=np.int64)
    seq_lens = np.full(batch, seq, dtype=np.int64)
    ids = torch.randint(0, vocab, (batch * n,), device=dev)
    mask = None
    if tree is not None:
        qsl = np.concatenate([[0], np.cumsum(qlens)])
        depth = np.asarray(tree.depths, dtype=np.int64)
        pos = np.tile(context + depth, batch)  # nodes rotate at their depth position
        mask = TreeMask.build(np.tile(np.asarray(tree.ancestor_bits, dtype=np.int64), batch),
                              np.full(batch, n, dtype=np.int32), qsl, dev)
    slots = np.arange(batch, dtype=np.int64)

    verify = frozenset(range(batch)) if n > 1 else frozenset()  # rows attended as the engine verifies them

    def step() -> None:
        groups = len(runner.buffers.group_slot_mapping) + 1  # every group of layers reads the same table
        hidden = runner.run(ids, pos, [slot_map] * groups, qlens, seq_lens, slots, [block_table] * groups, tree=mask,
                            verify_seqs=verify)
        worker.model.compute_logits(hidden)

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cost_curve(args: argparse.Namespace) -> dict:
    from flashserve import LLM
    from flashserve.spec.draft import StepRunner

    kw = llm_kwargs(args)
    if kw.get("model") is None:
        kw.update(model="llama-3.1-8b", load_format="dummy")
    batches = _ints(args.cost_batch_sizes)
    kw["max_num_seqs"] = max(batches)
    kw["max_model_len"] = max(kw.get("max_model_len") or 0, args.context + 80)
    kw["verbose"] = False
    llm = LLM(**kw)
    w = llm.engine.worker
    vocab = llm.engine.model_config.vocab_size
    sizes_needed = max(batches) * max(max(_ints(args.tree_sizes)), 1 + max(_ints(args.chain_ks)))
    graphs = w.device.type == "cuda" and w.config.cuda_graphs and w.attn_backend.name == "triton"
    runner = StepRunner(w.model, w.kv_caches, w.block_size, max(sizes_needed, 64), max(batches), w.max_blocks,
                        w.max_model_len, w.device, graphs, w.config.max_mixed_graph_tokens, w.layout.num_groups)
    rows = []
    for b in batches:
        base = _time_step(w, runner, vocab, b, 1, args.context, None, args.repeats)
        rows.append({"batch": b, "shape": "decode", "tokens": 1, "ms": base * 1e3, "ratio": 1.0})
        for k in _ints(args.chain_ks):
            t = _time_step(w, runner, vocab, b, 1 + k, args.context, None, args.repeats)
            rows.append({"batch": b, "shape": "chain", "tokens": 1 + k, "ms": t * 1e3, "ratio": t / base})
        for n in _ints(args.tree_sizes):
            if n > 64:
                raise ValueError(f"tree sizes are at most 64 nodes, got {n}")
            t = _time_step(w, runner, vocab, b, n, args.context, _heap_tree(n), args.repeats)
            rows.append({"batch": b, "shape": "tree", "tokens": n, "ms": t * 1e3, "ratio": t / base})
    return {"model": kw["model"], "device": str(w.device), "dtype": w.info.dtype, "context": args.context,
            "graphs": graphs, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def print_cost_curve(res: dict) -> None:
    print(f"{res['model']} ({res['dtype']}) on {res['device']}, context {res['context']}, "
          f"chains {'CUDA graphs' if res['graphs'] else 'eager'}, trees eager, {res['date']}")
    print(f"{'batch':>5} {'shape':<7} {'tokens/seq':>10} {'ms/step':>9} {'x decode':>9}  cost (| = one decode step)")
    for r in res["rows"]:
        print(f"{r['batch']:>5} {r['shape']:<7} {r['tokens']:>10} {r['ms']:>9.3f} {r['ratio']:>9.2f}  "
              f"{_bar(r['ratio'], 10)}")


def run(args: argparse.Namespace) -> int:
    if args.cost_curve:
        res = run_cost_curve(args)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(res, f, indent=1)
        print_cost_curve(res)
        return 0
    res = run_methods(args)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=1)
    print_methods(res)
    return 0
