"""``flashserve train-heads``: train Medusa-style drafting heads on the target's own generations.

1. The target answers a fixed training prompt set (``flashserve.spec.prompts.training_prompts``,
   disjoint from the benchmark prompts) with the engine, greedy by default: self-distillation,
   so the heads learn what the model itself will say.
2. Each conversation (prompt + answer) is read back teacher-forced through the paged cache to
   get the final hidden states h_t.
3. Head i learns token t + 2 + i from h_t (cross-entropy through the frozen LM head; positions
   from the end of the prompt on; head losses weighted 0.8^i as in Medusa), with AdamW.
4. A held-out tenth of the conversations gives each head's top-1 .. top-8 accuracy, stored in
   the file's metadata and printed as a table; the heads are saved as safetensors, by default
   beside the model (``flashserve.spec.heads.default_heads_path``).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flashserve.spec.heads import HeadsMetadata, MedusaHeads, default_heads_path, model_fingerprint, save_heads

TOPK = 8


@dataclass
class TrainReport:
    num_sequences: int
    num_positions: int
    generate_s: float
    train_s: float
    accuracy: list[list[float]]  # [head][j] top-(j+1) accuracy on held-out positions
    final_loss: float


def _hidden_states(engine, token_ids: list[int], chunk: int = 512) -> torch.Tensor:
    """Final hidden states [len, hidden] of a sequence, teacher-forced through the paged cache."""
    worker = engine.worker
    if worker is None:
        raise ValueError("train-heads needs the Worker in this process (executor 'inproc')")
    bm, rid = engine.block_manager, "__train_heads__"
    if bm.allocate_slots(rid, len(token_ids)) is None:
        raise ValueError(f"{len(token_ids)} tokens do not fit the KV cache; lower --max-tokens")
    try:
        tables = bm.block_tables(rid)  # one per group of layers (flashserve.cache.kv_groups)
        parts = [worker.hidden_chunk(token_ids[s : s + chunk], s, tables) for s in range(0, len(token_ids), chunk)]
    finally:
        bm.free(rid)
    return torch.cat(parts).float()


def _examples(hidden: torch.Tensor, tokens: list[int], start: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [n, H], targets [n, heads]) for positions start .. len - 2; target -100 past the end."""
    L = len(tokens)
    pos = torch.arange(start, L - 1)
    t = torch.tensor(tokens + [-100] * (num_heads + 2))
    targets = torch.stack([t[pos + 2 + i] for i in range(num_heads)], dim=1)
    return hidden[pos], targets


def train_heads(engine, prompts: list[str] | list[list[int]], num_heads: int = 4, max_tokens: int = 128, epochs: int = 2,
                batch_size: int = 256, lr: float = 1e-3, temperature: float = 0.0, seed: int = 0,
                log=print) -> tuple[MedusaHeads, HeadsMetadata, TrainReport]:
    from flashserve.sampling_params import SamplingParams

    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    model = engine.worker.model if engine.worker is not None else None
    if model is None:
        raise ValueError("train-heads needs the Worker in this process (executor 'inproc')")
    dev = engine.device
    t0 = time.perf_counter()
    use_chat = bool(getattr(engine.tokenizer, "chat_template", None))
    texts = [engine.apply_chat_template([{"role": "user", "content": p}]) if use_chat and isinstance(p, str) else p
             for p in prompts]
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed if temperature > 0 else None)
    for i, text in enumerate(texts):
        engine.add_request(f"train-{i}", text, params, add_special_tokens=not use_chat, stream=False)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    gen_s = time.perf_counter() - t0
    seqs = [(done[f"train-{i}"].prompt_token_ids, done[f"train-{i}"].outputs[0].token_ids) for i in range(len(texts))]
    rng = random.Random(seed)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    n_val = max(1, len(seqs) // 10) if len(seqs) > 1 else 0
    splits = {"val": order[:n_val], "train": order[n_val:] or order}
    data = {}
    for name, idx in splits.items():
        hs, ts = [], []
        for i in idx:
            prompt, output = seqs[i]
            tokens = list(prompt) + list(output)
            h, t = _examples(_hidden_states(engine, tokens), tokens, max(0, len(prompt) - 1), num_heads)
            hs.append(h)
            ts.append(t)
        data[name] = (torch.cat(hs).to(dev), torch.cat(ts).to(dev))
    h_train, t_train = data["train"]
    log(f"train-heads: {len(seqs)} generations ({gen_s:.1f}s), {len(h_train)} training positions, "
        f"{len(data['val'][0])} held out")

    torch.manual_seed(seed)
    heads = MedusaHeads(num_heads, h_train.shape[1]).to(dev).float().train()
    lm_head = model.lm_head.dense_weight()  # [V, H], frozen
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    weights = torch.tensor([0.8**i for i in range(num_heads)], device=dev)
    steps = max(1, epochs * math.ceil(len(h_train) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    t1 = time.perf_counter()
    loss_v = float("nan")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(h_train), generator=gen).to(dev)
            for s in range(0, len(perm), batch_size):
                idx = perm[s : s + batch_size]
                states = heads(h_train[idx])  # [n, B, H]
                logits = states @ lm_head.T  # [n, B, V]
                tgt = t_train[idx].T  # [n, B]
                per_head = torch.stack([torch.nn.functional.cross_entropy(logits[i], tgt[i], ignore_index=-100)
                                        for i in range(num_heads)])
                per_head = torch.nan_to_num(per_head)  # a head with no target in this batch
                loss = (weights * per_head).sum() / weights.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_v = float(loss.detach())
                step += 1
                if step % max(1, steps // 10) == 0:
                    log(f"  step {step}/{steps}: loss {loss_v:.3f}")
    train_s = time.perf_counter() - t1
    heads.eval()
    accuracy = _accuracy(heads, lm_head, *data["val"]) if n_val else [[0.0] * TOPK for _ in range(num_heads)]
    cfg = model.config
    meta = HeadsMetadata(num_heads, cfg.hidden_size, cfg.vocab_size, model_fingerprint(model), accuracy,
                         engine.model_name)
    report = TrainReport(len(seqs), len(h_train), gen_s, train_s, accuracy, loss_v)
    return heads, meta, report


@torch.no_grad()
def _accuracy(heads: MedusaHeads, lm_head: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> list[list[float]]:
    acc = torch.zeros(heads.num_heads, TOPK, device=h.device)
    count = torch.zeros(heads.num_heads, device=h.device)
    for s in range(0, len(h), 1024):
        top = (heads(h[s : s + 1024]) @ lm_head.T).topk(TOPK, dim=-1).indices  # [n, B, K]
        tgt = t[s : s + 1024].T  # [n, B]
        hit = (top == tgt[..., None]).cumsum(dim=-1).clamp(max=1).float()  # [n, B, K]
        valid = (tgt >= 0).float()
        acc += (hit * valid[..., None]).sum(dim=1)
        count += valid.sum(dim=1)
    return (acc / count.clamp(min=1)[:, None]).tolist()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flashserve.cli import add_engine_arguments

    add_engine_arguments(p)
    p.add_argument("--num-heads", type=int, default=4, help="heads: drafts at +2 .. +num_heads+1")
    p.add_argument("--num-prompts", type=int, default=96, help="training prompts (chat, code, passages)")
    p.add_argument("--max-tokens", type=int, default=192, help="tokens the target generates per prompt")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256, help="positions per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the generations")
    p.add_argument("--output", default=None, help="heads file (default: beside the model)")


def run(args: argparse.Namespace) -> int:
    from flashserve.cli import llm_kwargs
    from flashserve.engine.llm import LLM
    from flashserve.loader import default_model_path
    from flashserve.spec.prompts import training_prompts

    llm = LLM(**llm_kwargs(args), verbose=False)
    engine = llm.engine
    heads, meta, rep = train_heads(engine, training_prompts(args.num_prompts), args.num_heads, args.max_tokens,
                                   args.epochs, args.batch_size, args.lr, args.temperature, args.seed)
    out = Path(args.output) if args.output else default_heads_path(args.model or default_model_path())
    save_heads(heads, meta, out)
    print(f"\ntrain-heads: {engine.model_name} on {engine.device}; {rep.num_sequences} generations, "
          f"{rep.num_positions} positions; generate {rep.generate_s:.1f}s, train {rep.train_s:.1f}s; "
          f"final loss {rep.final_loss:.3f}")
    print(f"saved {out}\n")
    print("| head (predicts) | top-1 | top-2 | top-4 | top-8 |")
    print("|---|---|---|---|---|")
    for i, acc in enumerate(rep.accuracy):
        print(f"| {i} (t+{i + 2}) | {acc[0]:.3f} | {acc[1]:.3f} | {acc[3]:.3f} | {acc[7]:.3f} |")
    return 0
