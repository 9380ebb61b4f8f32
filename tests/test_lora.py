"""Multi-LoRA serving (flashserve.lora) against PEFT: requests for two adapters and for the base
model batched in one engine each give the greedy tokens PEFT's model with their adapter gives
(prefill, decode, chunked prefill, parallel ranks, speculative decoding); prefix caching never
shares K/V across adapters; quantized base weights take adapters too; bad adapters and unknown
names are clear errors that leave the engine serving."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_lora import edited_adapter, greedy_tokens, load_base, peft_oracle, write_peft_adapter
from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from test_engine import prompts

NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base model folder, {adapter name: folder}): adapter 'all' adapts every projection at rank
    8; 'qv' only q and v at rank 4, rsLoRA scaling."""
    base = tmp_path_factory.mktemp("lora_base")
    make_tiny_checkpoint("llama3_gqa", base, seed=3)
    adapters = {"all": write_peft_adapter(base, tmp_path_factory.mktemp("lora_all"), seed=1, r=8, alpha=16),
                "qv": write_peft_adapter(base, tmp_path_factory.mktemp("lora_qv"), seed=2, r=4, alpha=4,
                                         targets=("q_proj", "v_proj"), use_rslora=True)}
    return str(base), {k: str(v) for k, v in adapters.items()}


@pytest.fixture(scope="module")
def oracles(tiny):
    """name (None: the base model) -> the PEFT / transformers model."""
    base, adapters = tiny
    return {None: load_base(base), **{name: peft_oracle(base, path) for name, path in adapters.items()}}


def _engine(tiny, **kw) -> LLM:
    base, adapters = tiny
    args = dict(model=base, device="cpu", block_size=4, max_model_len=256, kv_cache_bytes=8 << 20, verbose=False,
                lora_modules=adapters)
    return LLM(**{**args, **kw})


def _params(lora=None, n=NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, lora=lora)


def test_adapters_and_base_in_one_batch_match_peft(tiny, oracles):
    batch = prompts(6, seed=21, lo=5, hi=40)
    names = ["all", None, "qv", "all", "qv", None]
    outs = _engine(tiny).generate(batch, [_params(n) for n in names], use_tqdm=False)
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name
    alone = {name: greedy_tokens(oracles[name], batch[0], NEW) for name in oracles}
    assert len(set(map(tuple, alone.values()))) == 3  # each adapter changes this model's tokens


def test_chunked_prefill_and_one_request_at_a_time(tiny, oracles):
    """Prompts split over several steps (8 tokens a step), mixed with the others' decodes."""
    batch = prompts(3, seed=22, lo=20, hi=40)
    names = ["qv", "all", None]
    llm = _engine(tiny, max_num_batched_tokens=8)
    outs = llm.generate(batch, [_params(n) for n in names], use_tqdm=False)
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name
    one = llm.generate(batch[:1], _params("qv"), use_tqdm=False)[0]
    assert one.token_ids == outs[0].token_ids


def test_prefix_cache_is_per_adapter(tiny, oracles):
    llm = _engine(tiny)
    prompt = prompts(1, seed=23, lo=32, hi=32)[0]
    first = llm.generate([prompt], _params("all"), use_tqdm=False)[0]
    other = llm.generate([prompt], _params("qv"), use_tqdm=False)[0]
    base = llm.generate([prompt], _params(None), use_tqdm=False)[0]
    again = llm.generate([prompt], _params("qv"), use_tqdm=False)[0]
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0  # 'all' computed other K/V
    assert again.num_cached_tokens > 0 and again.token_ids == other.token_ids
    assert [first.token_ids, other.token_ids, base.token_ids] == \
        [greedy_tokens(oracles[n], prompt, NEW) for n in ("all", "qv", None)]


def test_sampled_requests_keep_their_adapter(tiny):
    """Seeded sampling: a request's tokens do not depend on the adapters of its batch mates."""
    batch = prompts(2, seed=24, lo=8, hi=12)
    params = [SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True, lora=n) for n in ("all", None)]
    llm = _engine(tiny)
    together = llm.generate(batch, params, use_tqdm=False)
    alone = [llm.generate([p], [sp], use_tqdm=False)[0] for p, sp in zip(batch, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_quantized_base_weights_take_adapters(tiny, oracles):
    """int8 base weights (online): the adapter's delta is added to the quantized product, so its
    tokens follow the int8 engine's own, changed the way PEFT's are."""
    batch = prompts(2, seed=25, lo=10, hi=20)
    llm = _engine(tiny, quantization="int8")
    with_lora = llm.generate(batch, [_params("all"), _params(None)], use_tqdm=False)
    plain = LLM(model=tiny[0], device="cpu", block_size=4, max_model_len=256, kv_cache_bytes=8 << 20, verbose=False,
                quantization="int8").generate(batch[1:], _params(), use_tqdm=False)[0]
    assert with_lora[1].token_ids == plain.token_ids
    agree = sum(a == b for a, b in zip(with_lora[0].token_ids, greedy_tokens(oracles["all"], batch[0], NEW)))
    assert agree >= NEW // 2  # int8 rounding may flip a near tie; the adapter's tokens, not the base's


def test_unknown_adapter_is_a_clear_error_and_the_engine_keeps_serving(tiny, oracles):
    llm = _engine(tiny)
    prompt = prompts(1, seed=26, lo=8, hi=8)[0]
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'; this engine serves 'all', 'qv'"):
        llm.generate([prompt], _params("nope"), use_tqdm=False)
    assert llm.generate([prompt], _params("qv"), use_tqdm=False)[0].token_ids == \
        greedy_tokens(oracles["qv"], prompt, NEW)
    with pytest.raises(ValueError, match="lora must be the name of a served LoRA adapter"):
        SamplingParams(lora="")
    base_only = LLM(model=tiny[0], device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=8 << 20,
                    verbose=False)
    with pytest.raises(ValueError, match="this engine serves none"):
        base_only.generate([prompt], _params("all"), use_tqdm=False)


def test_adapter_for_another_model_is_refused_at_start(tiny, tmp_path):
    other = tmp_path / "other"
    make_tiny_checkpoint("llama3_gqa", other, seed=4, intermediate_size=96)
    wrong = write_peft_adapter(other, tmp_path / "wrong", seed=1, targets=("down_proj",))
    with pytest.raises(ValueError, match=r"'wrong'.*down_proj has A \(4, 96\).*another model"):
        _engine(tiny, lora_modules={"wrong": str(wrong)})
    # an adapter of a module the model does not have as a linear layer
    def rename(state):
        for k in [k for k in state if "self_attn.q_proj" in k]:
            state[k.replace("self_attn.q_proj", "self_attn.rotary")] = state.pop(k)

    extra = edited_adapter(Path(tiny[1]["qv"]), tmp_path / "extra", tensors=rename)
    with pytest.raises(ValueError, match="no linear layer for: model.layers.0.self_attn.rotary"):
        _engine(tiny, lora_modules={"extra": str(extra)})


@pytest.mark.parametrize("spec", [dict(method="ngram"), dict(method="ngram", tree_width=3), dict(method="draft"),
                                  dict(method="heads", num_speculative_tokens=3), dict(method="layers", num_layers=1),
                                  dict(method="layers", num_layers=1, tree_width=2)],
                         ids=["ngram", "ngram-tree", "draft", "heads", "layers", "layers-tree"])
def test_speculative_decoding_with_adapters_gives_peft_tokens(tiny, oracles, tmp_path, monkeypatch, spec):
    """Drafts (prompt lookup, chains and trees; the base model as a draft model, and heads trained
    on the base model, which know no adapter; the target's first layer, each draft token with its
    request's adapter) verified by the adapted target: each request keeps PEFT's greedy tokens for
    its adapter, as plain decoding does."""
    batch = prompts(4, seed=27, lo=6, hi=20)
    batch[1] = batch[1][:6] * 4  # n-gram hits
    names = ["all", "qv", None, "all"]
    config = {"num_speculative_tokens": 4, "disable_by_cost": False, **spec}
    if spec["method"] == "draft":
        config["model"] = tiny[0]
    if spec["method"] == "heads":
        from test_spec_engine import train_small_heads

        config["heads"] = train_small_heads(tiny[0], tmp_path, num_prompts=8, max_tokens=24, epochs=4, min_top1=0.1)
    llm = _engine(tiny, speculative_config=config, kv_cache_bytes=16 << 20)
    if spec["method"] == "layers":  # each draft pass sees its tokens' adapters
        from flashserve.spec.draft import StepRunner

        lora, batch_slots, run = llm.engine.worker.lora.batch, llm.engine.worker.batch, StepRunner.run
        passes = []  # (each token's adapter as the layers read it, as its request has it)

        def checked(runner, ids, positions, slot_maps, query_lens, seq_lens, request_slots, *a, **kw):
            want = np.repeat(batch_slots.lora[request_slots], query_lens).tolist()
            passes.append((lora.ids[: len(want)].tolist(), want))
            return run(runner, ids, positions, slot_maps, query_lens, seq_lens, request_slots, *a, **kw)

        monkeypatch.setattr(StepRunner, "run", checked)
    outs = llm.generate(batch, [_params(n) for n in names], use_tqdm=False)
    if spec["method"] == "layers":
        assert all(got == want for got, want in passes) and {0, 1} <= {s for _, want in passes for s in want}
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name
    stats = llm.engine.stats().spec
    assert stats.num_steps > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.parametrize("kw,message", [
    (dict(batch_invariant=True), "do not combine with batch_invariant=True"),
    (dict(lora_modules=["all"]), "give NAME=PATH"),
    (dict(lora_modules=["a=x", "a=y"]), "twice"),
])
def test_bad_engine_options_are_clear_errors(tiny, kw, message):
    with pytest.raises(ValueError, match=message):
        _engine(tiny, **kw)


@torch.no_grad()
def test_layer_delta_matches_merged_weights(tiny):
    """One adapted layer against its merged weight (W + B A * scaling), tokens of two adapters and
    none in one call, and tokens of one adapter: the masked product over every adapter's columns
    (the GPU's form), the product per adapter the step uses (the CPU's torch form) and the native
    kernel (the CPU's fp32 form)."""
    from flashserve.kernels import cpu_native
    from flashserve.layers.linear import QKVLinear
    from flashserve.lora.adapter import load_adapter
    from flashserve.lora.layers import install_adapters

    base, adapters = tiny
    cfg = json.loads(open(f"{base}/config.json").read())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    layer = QKVLinear(cfg["hidden_size"], head_dim, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                      prefix="model.layers.0.self_attn.qkv_proj")
    torch.nn.init.normal_(layer.weight, std=0.1)
    names = {p.name for p in layer.partitions}
    loaded = [load_adapter(n, p) for n, p in adapters.items()]
    loaded = [replace(a, weights={k: v for k, v in a.weights.items() if k in names}) for a in loaded]
    holder = torch.nn.Module()
    holder.layer = layer
    batch = install_adapters(holder, loaded, torch.float32, torch.device("cpu")).batch
    method = layer.quant_method
    native = method.native
    assert (native is not None) == cpu_native.available()
    x = torch.randn(5, cfg["hidden_size"])

    def merged(slot: int, row: int) -> torch.Tensor:
        w = layer.weight.clone()
        for p in layer.partitions:
            if slot >= 0 and p.name in loaded[slot].weights:
                a, b = loaded[slot].weights[p.name]
                w[p.offset : p.offset + p.size] += b @ a
        return w @ x[row]

    for ids in ([0, -1, 1, 1, 0], [1] * 5):
        batch.ids = torch.tensor(ids)
        outputs = {}
        method.native, batch.groups = None, None
        outputs["masked"] = layer(x)  # every adapter's columns, masked per token
        batch.set_step(np.array(ids))
        outputs["grouped"] = layer(x)  # only the step's adapters, each on its tokens
        if native is not None:
            method.native = native
            outputs["native"] = layer(x)
        for form, y in outputs.items():
            for row, slot in enumerate(ids):
                torch.testing.assert_close(y[row], merged(slot, row), atol=1e-5, rtol=1e-5, msg=f"{form} {ids}")


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2),
                                      dict(executor="process"), dict(num_scheduler_steps=4)])
def test_engine_modes_take_the_adapters(tiny, oracles, parallel):
    """Two gloo ranks. Tensor parallel: column-parallel layers keep their rows of each B,
    row-parallel ones their columns of each A (the delta summed with the base product). Pipeline
    parallel: each stage adapts its own layers. Also the Worker in its own process and multi-step
    plans (later steps keep the first step's adapter row). The tokens are PEFT's."""
    batch = prompts(3, seed=27, lo=6, hi=30)
    names = ["all", "qv", None]
    llm = _engine(tiny, **parallel)
    try:
        outs = llm.generate(batch, [_params(n) for n in names], use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name


@pytest.mark.slow
@torch.no_grad()
def test_the_embedded_smollm2_gguf_takes_an_adapter(tmp_path):
    """The real SmolLM2-135M GGUF with an adapter on q, v and down: flashserve on the exact fp32
    dequantization gives PEFT's greedy tokens (transformers' GGUF loader + PeftModel), and the
    packed GGUF kernels (the default on the CPU, whose decode steps run the whole layer stack in one
    native call, adapters included, where that kernel builds) the same tokens."""
    import os

    import peft
    from transformers import AutoModelForCausalLM

    from flashserve.kernels import cpu_native
    from flashserve.loader import default_model_path, load_tokenizer
    from flashserve.models.cpu_decode import CpuDecodeStack

    try:
        gguf = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    tok = load_tokenizer(gguf)
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    base = greedy_tokens(model, ids, 16)
    oracle = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                        target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in sorted(oracle.named_parameters()):
        if ".lora_" in name:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    oracle.save_pretrained(str(tmp_path / "adapter"))
    want = greedy_tokens(oracle, ids, 16)
    assert want != base  # the adapter changes the answer
    for quantization in ("none", "auto"):  # exact fp32 weights; the packed GGUF kernels
        llm = LLM(gguf, device="cpu", quantization=quantization, verbose=False,
                  lora_modules={"colours": str(tmp_path / "adapter")})
        stack = llm.engine.worker.model.model.__dict__.get("run_layers")
        assert isinstance(stack, CpuDecodeStack) == (quantization == "auto" and cpu_native.available())
        got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, lora="colours"),
                           use_tqdm=False)[0].token_ids
        assert got == want, quantization


def test_beam_search_runs_with_the_adapter(tiny, oracles):
    """``BeamSearchParams(lora=...)``: every beam runs with the adapter; the hypotheses are those of
    transformers' beam search on PEFT's model. An unknown name is refused like a request's."""
    from flashserve import BeamSearchParams

    prompt = prompts(1, seed=28, lo=9, hi=9)[0]
    out = _engine(tiny).beam_search([prompt], BeamSearchParams(3, 8, lora="all"), use_tqdm=False)[0]
    ref = oracles["all"].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  num_beams=3, num_return_sequences=3, max_new_tokens=8, do_sample=False,
                                  early_stopping=False, pad_token_id=0)
    assert [c.token_ids for c in out.outputs] == [s[len(prompt):] for s in ref.tolist()]
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'"):
        _engine(tiny).beam_search([prompt], BeamSearchParams(3, 8, lora="nope"), use_tqdm=False)



def test_generate_and_chat_commands_take_adapters():
    from flashserve.cli import build_parser, llm_kwargs, sampling_params
    from flashserve.config import EngineArgs

    for command in ("generate", "chat"):
        args = build_parser().parse_args([command, *(["hi"] if command == "generate" else []),
                                          "--lora-modules", "qv=/a", "all=/b", "--lora", "qv"])
        assert sampling_params(args).lora == "qv"
        assert EngineArgs(**llm_kwargs(args)).engine_config().lora_modules == (("qv", "/a"), ("all", "/b"))
