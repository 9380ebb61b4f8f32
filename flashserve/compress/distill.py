"""``flashserve distill``: train a shallower student on text its teacher generates.

    flashserve distill [--model TEACHER] --layers N --output DIR [--mode white|black]

1. Data: the teacher (an ordinary engine) samples continuations of a fixed prompt set
   (flashserve.compress.prompts, chat prompts through its chat template), temperature 1.
2. Student: the teacher with N of its layers (evenly spread, first and last kept; ``--init first``
   keeps the first N), so training starts from the teacher's own weights; or any model directory
   sharing the teacher's vocabulary (``--student``: a pruned or factorised model to heal; pruned
   weights stay zero during training, a low-rank model stays low rank).
3. Training, on the generated tokens only (the prompt is ours, not the teacher's):
   white box, KL(teacher || student) over the whole next-token distribution, which needs the
   teacher's logits (computed on the fly); black box, cross-entropy on the sampled tokens alone,
   as with an API that returns only text. AdamW, warm-up then cosine decay, gradient clipping;
   bf16 autocast with fp32 weights on CUDA, fp32 on CPU.
4. Report: held-out KL during training; the student's perplexity, KL and top-1 agreement against
   the teacher on GPL-3 (flashserve.compress.evaluate); and its acceptance length as a greedy
   speculative draft against an undistilled draft: the teacher's first N layers (``--student``:
   the student before training).

The student is written as a model directory (safetensors, config.json, the teacher's tokenizer).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.compress.packed import packed

MODES = ("white", "black")


@dataclass(frozen=True)
class Sample:
    """One teacher-generated sequence; the loss covers the tokens from ``prompt_len`` on."""

    token_ids: list[int]
    prompt_len: int


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "white"  # white: KL on the teacher's full distribution; black: cross-entropy on its tokens
    steps: int = 200
    batch_tokens: int = 8192
    lr: float = 2e-4
    warmup: float = 0.05  # share of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be white or black, got {self.mode!r}")
        if self.steps < 0 or self.batch_tokens < 2 or self.lr <= 0:
            raise ValueError(f"need steps >= 0, batch_tokens >= 2 and lr > 0 (got {self.steps}, {self.batch_tokens}, {self.lr})")


# ---------------------------------------------------------------------------------- student
def select_layers(num_teacher: int, num_student: int, init: str = "spread") -> list[int]:
    """Teacher layer indices the student starts from: evenly spread (first and last kept) or the first N."""
    if num_student > num_teacher:
        raise ValueError(f"a student of {num_student} layers would be deeper than its teacher ({num_teacher} layers)")
    if num_student < 1:
        raise ValueError(f"the student needs at least 1 layer, got {num_student}")
    if init == "first":
        return list(range(num_student))
    if init != "spread":
        raise ValueError(f"--init must be spread or first, got {init!r}")
    if num_student == 1:
        return [0]
    return sorted({round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)})


def make_student(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` (fp32, trainable) keeping only ``layers`` (its shared rotary, norm and head kept)."""
    student = copy.deepcopy(teacher).float()
    student.model.layers = nn.ModuleList([student.model.layers[i] for i in layers])
    student.model._rope_index = [student.model._rope_index[i] for i in layers]  # each layer keeps its rope base
    specs = teacher.config.layer_types
    student.config = dataclasses.replace(teacher.config, num_layers=len(layers),
                                         layer_types=tuple(specs[i] for i in layers) if specs is not None else None)
    return student.train().requires_grad_(True)


def student_config_json(config_json: dict[str, Any], config: Any, layers: Sequence[int]) -> dict[str, Any]:
    """The teacher's config.json for a student of its ``layers``: the depth, and, when some layers
    attend through a sliding window (Gemma 3's local layers), each kept layer's attention kind."""
    out = {**config_json, "num_hidden_layers": len(layers)}
    kinds = [config.layer_spec(i).attention.kind for i in range(config.num_layers)]
    if "sliding" in kinds:
        out["layer_types"] = ["sliding_attention" if kinds[i] == "sliding" else "full_attention" for i in layers]
        out.pop("sliding_window_pattern", None)  # the list above replaces the periodic rule
    return out


# ---------------------------------------------------------------------------------- losses
def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _targets(batch: Sequence[Sample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the packed batch whose next token is generated [N], those next tokens [N])."""
    rows, nxt, start = [], [], 0
    for s in batch:
        rows += range(start + s.prompt_len - 1, start + len(s.token_ids) - 1)
        nxt += s.token_ids[s.prompt_len :]
        start += len(s.token_ids)
    return torch.tensor(rows, device=device), torch.tensor(nxt, device=device)


def _logits(model: nn.Module, batch: Sequence[Sample], rows: torch.Tensor) -> torch.Tensor:
    """fp32 logits [N, V] at ``rows`` of the packed batch."""
    device = rows.device
    with packed([s.token_ids for s in batch], device) as (ids, pos), _autocast(device):
        hidden = model(ids, pos, None)  # [T, hidden]
        return model.compute_logits(hidden.index_select(0, rows)).float()


def batch_loss(student: nn.Module, teacher: nn.Module | None, batch: Sequence[Sample], mode: str) -> tuple[torch.Tensor, int]:
    """(mean loss over the batch's generated tokens, their count)."""
    device = next(student.parameters()).device
    rows, nxt = _targets(batch, device)
    logp = _logits(student, batch, rows).log_softmax(-1)  # [N, V]
    if mode == "black":
        return F.nll_loss(logp, nxt), len(rows)
    assert teacher is not None
    with torch.no_grad():
        t_logp = _logits(teacher, batch, rows).log_softmax(-1)
    vocab = min(logp.shape[1], t_logp.shape[1])
    return F.kl_div(logp[:, :vocab], t_logp[:, :vocab], log_target=True, reduction="batchmean"), len(rows)


def batches(samples: Sequence[Sample], batch_tokens: int, rng: random.Random | None = None) -> list[list[Sample]]:
    """Consecutive samples (shuffled when ``rng`` is given) packed up to ``batch_tokens`` each."""
    order = list(samples)
    if rng is not None:
        rng.shuffle(order)
    out: list[list[Sample]] = []
    size = 0
    for s in order:
        if len(s.token_ids) > batch_tokens:
            raise ValueError(f"a sample of {len(s.token_ids)} tokens exceeds --batch-tokens {batch_tokens}")
        if not out or size + len(s.token_ids) > batch_tokens:
            out.append([])
            size = 0
        out[-1].append(s)
        size += len(s.token_ids)
    return out


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher: nn.Module, samples: Sequence[Sample], batch_tokens: int) -> float:
    """Mean KL(teacher || student) per generated token of ``samples``."""
    was_training = student.training
    student.eval()
    total = count = 0.0
    for batch in batches(samples, batch_tokens):
        loss, n = batch_loss(student, teacher, batch, "white")
        total += loss.item() * n
        count += n
    student.train(was_training)
    return total / max(count, 1)


def sparsity_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Non-zero masks of the decoder linears' weights, to keep a pruned student pruned."""
    return {p: p.detach() != 0 for n, p in model.named_parameters() if ".layers." in n and n.endswith("_proj.weight")}


def train(student: nn.Module, teacher: nn.Module, train_set: Sequence[Sample], val_set: Sequence[Sample],
          cfg: TrainConfig, log: Callable[[str], None] = print,
          masks: dict[nn.Parameter, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Train ``student`` in place; returns the history of (step, train loss, held-out KL).

    The teacher's logits enter the loss only in white-box mode; in black-box mode they serve only
    to measure the held-out KL (a measurement, never a training signal). ``masks`` (from
    ``sparsity_masks``) are re-applied after every step, so pruned weights stay zero."""
    if not train_set:
        raise ValueError("no training samples")
    loss_teacher = teacher if cfg.mode == "white" else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warm = max(1, round(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    rng = random.Random(cfg.seed)
    history = []
    if val_set:
        history.append({"step": 0, "heldout_kl": heldout_kl(student, teacher, val_set, cfg.batch_tokens)})
        log(f"step 0: held-out KL {history[-1]['heldout_kl']:.4f}")
    epoch: list[list[Sample]] = []
    running, t0 = 0.0, time.perf_counter()
    student.train()
    for step in range(1, cfg.steps + 1):
        if not epoch:
            epoch = batches(train_set, cfg.batch_tokens, rng)
        loss, _ = batch_loss(student, loss_teacher, epoch.pop(), cfg.mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if masks:
            with torch.no_grad():
                for p, m in masks.items():
                    p.mul_(m)
        running += loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            entry = {"step": step, "train_loss": running / (step - (history[-1]["step"] if history else 0)),
                     "seconds": time.perf_counter() - t0}
            running = 0.0
            if val_set:
                entry["heldout_kl"] = heldout_kl(student, teacher, val_set, cfg.batch_tokens)
            history.append(entry)
            log(f"step {step}: train loss {entry['train_loss']:.4f}"
                + (f", held-out KL {entry['heldout_kl']:.4f}" if "heldout_kl" in entry else "") + f" ({entry['seconds']:.0f}s)")
    student.eval()
    return history


# ---------------------------------------------------------------------------------- drafting
@torch.no_grad()
def greedy_matches(draft: nn.Module, targets: Sequence[Sample], batch_tokens: int = 8192) -> list[list[bool]]:
    """Per target sequence, whether the draft's argmax after each prefix equals the target's next
    token (teacher forced on the target model's own greedy continuation)."""
    out = []
    for batch in batches(targets, batch_tokens):
        rows, nxt = _targets(batch, next(draft.parameters()).device)
        hit = (_logits(draft, batch, rows).argmax(-1) == nxt).tolist()
        for s in batch:
            n = len(s.token_ids) - s.prompt_len
            out.append(hit[:n])
            hit = hit[n:]
    return out


def tokens_per_step(matches: Sequence[Sequence[bool]], k: int) -> float:
    """Mean tokens a greedy speculative step yields with ``k`` draft tokens: the accepted run of
    draft tokens plus the target's own token. Exact for greedy verification: an accepted draft
    token equals the target's, so the draft's next proposal sees the target's prefix."""
    tokens = steps = 0
    for m in matches:
        t = 0
        while t < len(m):
            run = 0
            while run < k and t + run < len(m) and m[t + run]:
                run += 1
            t += min(run + 1, len(m) - t)
            steps += 1
        tokens += len(m)
    return tokens / max(steps, 1)


# ---------------------------------------------------------------------------------- data
def generate_samples(llm: Any, prompts: Sequence[list[int]], num: int, max_tokens: int, temperature: float) -> list[Sample]:
    """``num`` teacher continuations of ``prompts`` (cycled). Sampling draws from the engine's
    seeded generator (``LLM(seed=...)``): the same run gives the same text."""
    from flashserve.sampling_params import SamplingParams

    if not prompts:
        raise ValueError("no prompts to generate from")
    chosen = [prompts[i % len(prompts)] for i in range(num)]
    outs = llm.generate(chosen, SamplingParams(temperature=temperature, max_tokens=max_tokens), use_tqdm=False)
    return [Sample(list(p) + list(o.token_ids), len(p)) for p, o in zip(chosen, outs) if o.token_ids]


def encode_prompts(tokenizer: Any, chat: Sequence[str], plain: Sequence[str]) -> list[list[int]]:
    """Token ids of chat prompts (through the chat template, when there is one) and plain prompts."""
    out = []
    if getattr(tokenizer, "chat_template", None):
        for text in chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            out.append(tokenizer.encode(prompt, add_special_tokens=False))  # the template holds the special tokens
    else:
        plain = [*chat, *plain]
    return out + [tokenizer.encode(text) for text in plain]


def save_samples(path: str | Path, teacher: str, samples: Sequence[Sample]) -> None:
    Path(path).write_text(json.dumps({"teacher": teacher, "samples": [[s.prompt_len, *s.token_ids] for s in samples]}))


def load_samples(path: str | Path, teacher: str) -> list[Sample]:
    data = json.loads(Path(path).read_text())
    if data.get("teacher") != teacher:
        raise ValueError(f"{path} holds text generated by {data.get('teacher')!r}, not by the teacher {teacher!r}")
    return [Sample(list(row[1:]), int(row[0])) for row in data["samples"]]


# ---------------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="teacher: HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="student model directory to write")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--layers", type=int, help="student depth: this many of the teacher's layers")
    who.add_argument("--student", default=None, help="start from this model directory instead (same vocabulary)")
    p.add_argument("--init", default="spread", choices=["spread", "first"], help="which teacher layers --layers keeps")
    p.add_argument("--mode", default="white", choices=MODES, help="white: KL on the teacher's logits; black: its sampled text only")
    p.add_argument("--samples", type=int, default=4096, help="teacher continuations to generate")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens per continuation (at most)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--data", default=None, help="JSON cache of the generated text: read if it exists, else written (shares it across runs)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--heldout", type=int, default=64, help="held-out continuations for the KL curve and the draft acceptance")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens per speculative step for the acceptance figure")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=2048, help="GPL-3 tokens for the quality figures (0: skip)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output-json", default=None)


def distill(args: argparse.Namespace) -> dict[str, Any]:
    from flashserve.compress.cli import resolve_device
    from flashserve.compress.model_io import check_output, hf_state_dict, load_source, write_model_dir
    from flashserve.compress.prompts import heldout_prompts, training_prompts
    from flashserve.engine.llm import LLM
    from flashserve.compress.layers import compression_spec

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    cfg = TrainConfig(mode=args.mode, steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr,
                      eval_every=args.eval_every, seed=args.seed)
    if args.samples < 1 or args.gen_tokens < 1 or args.heldout < 1:
        raise ValueError("--samples, --gen-tokens and --heldout must be >= 1")
    teacher_src = load_source(args.model, device)
    check_output(args.output, teacher_src.path, *([args.student] if args.student else []))
    tcfg = teacher_src.config
    tok = teacher_src.tokenizer
    if tok is None:
        raise ValueError(f"the teacher {teacher_src.path} has no tokenizer; distillation generates text from prompts")
    compression: dict[str, Any] = {"tool": "flashserve distill", "teacher": teacher_src.path, "mode": cfg.mode, "steps": cfg.steps}
    masks = None
    if args.student is not None:
        student_src = load_source(args.student, device)
        if student_src.config.vocab_size != tcfg.vocab_size:
            raise ValueError(f"the student's vocabulary ({student_src.config.vocab_size}) differs from the teacher's ({tcfg.vocab_size})")
        if student_src.config.num_layers > tcfg.num_layers:
            raise ValueError(f"the student has {student_src.config.num_layers} layers, deeper than its teacher ({tcfg.num_layers})")
        spec = compression_spec(student_src.config_json)
        compression.update({k: spec[k] for k in ("low_rank", "semi_structured") if k in spec}, student=student_src.path)
        student = student_src.model.float().train().requires_grad_(True)
        if spec.get("method") in ("magnitude", "wanda", "2:4"):
            masks = sparsity_masks(student)  # heal a pruned model without filling its zeros
        baseline_name, baseline = "student before training", copy.deepcopy(student).eval()
        layers, student_json = None, student_src.config_json
    else:
        layers = select_layers(tcfg.num_layers, args.layers, args.init)
        student = make_student(teacher_src.model, layers)
        student_json = student_config_json(teacher_src.config_json, tcfg, layers)
        compression["layers_from_teacher"] = layers
        baseline_name = f"teacher's first {len(layers)} layers"
        baseline = make_student(teacher_src.model, list(range(len(layers)))).eval()  # the undistilled draft
    teacher = teacher_src.model
    if device.type == "cuda":  # bf16 weights, as the engine serves it (buffers such as the rope table stay fp32)
        for p in teacher.parameters():
            p.data = p.data.to(torch.bfloat16)

    # 1. data: sampled training text, held-out sampled text, held-out greedy targets (drafting)
    t0 = time.perf_counter()
    chat, plain = training_prompts()
    hchat, hplain = heldout_prompts()
    train_prompts, held_prompts = encode_prompts(tok, chat, plain), encode_prompts(tok, hchat, hplain)
    max_len = max(map(len, train_prompts + held_prompts)) + args.gen_tokens + 1
    per_token = 2 * tcfg.num_layers * tcfg.num_kv_heads * tcfg.head_dim * (2 if device.type == "cuda" else 4)
    llm = LLM(teacher_src.path, device=str(device), max_model_len=min(max_len, tcfg.max_position_embeddings), verbose=False,
              kv_cache_bytes=min(256 * max_len * per_token, 8 << 30), max_num_seqs=256, seed=args.seed)
    if args.data and Path(args.data).is_file():
        train_set = load_samples(args.data, teacher_src.path)
    else:
        train_set = generate_samples(llm, train_prompts, args.samples, args.gen_tokens, args.temperature)
        if args.data:
            save_samples(args.data, teacher_src.path, train_set)
    val_set = generate_samples(llm, held_prompts, args.heldout, args.gen_tokens, args.temperature)
    greedy = generate_samples(llm, held_prompts, min(args.heldout, len(held_prompts)), args.gen_tokens, 0.0)
    del llm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen_s = time.perf_counter() - t0
    print(f"teacher text: {len(train_set)} training and {len(val_set)} held-out continuations, "
          f"{sum(len(s.token_ids) - s.prompt_len for s in train_set)} training tokens ({gen_s:.0f}s)", flush=True)

    # 2. training
    t0 = time.perf_counter()
    history = train(student, teacher, train_set, val_set, cfg, log=lambda s: print(s, flush=True), masks=masks)
    train_s = time.perf_counter() - t0

    # 3. drafting figures, then the model directory and its quality
    acceptance = {
        "k": args.draft_k,
        "distilled": tokens_per_step(greedy_matches(student, greedy, cfg.batch_tokens), args.draft_k),
        "baseline": tokens_per_step(greedy_matches(baseline, greedy, cfg.batch_tokens), args.draft_k),
        "baseline_draft": baseline_name,
    }
    out = write_model_dir(args.output, hf_state_dict(student), student_json, tok, compression, getattr(torch, args.save_dtype))
    summary: dict[str, Any] = {
        "teacher": teacher_src.path, "output": str(out), "mode": cfg.mode, "student_layers": student.config.num_layers,
        "teacher_layers": tcfg.num_layers, "layers_from_teacher": layers,
        "params": sum(p.numel() for p in student.parameters()), "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "train": dataclasses.asdict(cfg), "training_samples": len(train_set),
        "training_tokens": sum(len(s.token_ids) - s.prompt_len for s in train_set),
        "history": history, "acceptance": acceptance, "generate_seconds": gen_s, "train_seconds": train_s,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(f"wrote {out}: {summary['student_layers']} of {tcfg.num_layers} layers, {summary['params'] / 1e6:.1f}M parameters; "
          f"greedy draft acceptance (k={args.draft_k}): {acceptance['distilled']:.2f} tokens/step vs "
          f"{acceptance['baseline']:.2f} for the {baseline_name}", flush=True)
    del student, baseline, teacher
    if args.eval_tokens > 0:
        from flashserve.compress.evaluate import quality_summary

        summary["quality"] = quality_summary(args.model, str(out), args.eval_tokens, str(device))
    summary["seconds"] = time.perf_counter() - t_start
    return summary


def run(args: argparse.Namespace) -> int:
    from flashserve.compress.cli import run_tool

    return run_tool(distill, args, "distill")
