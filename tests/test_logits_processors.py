"""Logit bias and grammar masks in the batched sampler, against pure-torch / Python references.

The grammar tests use the real SmolLM2 tokenizer (no model) and random logits: whatever the
logits, the constrained row's text must parse and satisfy its schema, and the other rows of the
batch must be untouched.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from flashserve.layers.logits_processors import LogitsProcessors, unpack_bitmask, validate_structured_output
from flashserve.layers.sampler import Sampler, SamplingRow
from flashserve.sampling_params import SamplingParams, StructuredOutput

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tag": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "colour", "tag"],
    "additionalProperties": False,
}
EOS = [2]


@pytest.fixture(scope="module")
def tokenizer():
    from flashserve.loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path(), "auto")


def row(params: SamplingParams, output: list[int], rid: str) -> SamplingRow:
    return SamplingRow(params, len(output), None, (), rid, output)


def test_unpack_bitmask_matches_a_bit_loop():
    g = torch.Generator().manual_seed(0)
    vocab = 100
    packed = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    ref = torch.tensor([[(int(packed[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(3)], dtype=torch.bool)
    assert torch.equal(unpack_bitmask(packed, vocab), ref)


def test_logit_bias_matches_reference_and_leaves_input_alone():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    before = logits.clone()
    biases = [{3: 5.0, 7: -100.0}, None, {49: 0.5}]
    rows = [row(SamplingParams(logit_bias=b), [], f"r{i}") for i, b in enumerate(biases)]
    out = LogitsProcessors()(logits, rows)
    ref = before.clone()
    for i, b in enumerate(biases):
        for t, v in (b or {}).items():
            ref[i, t] += v
    assert torch.equal(logits, before)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    plain = [row(SamplingParams(), [], "p")]
    assert LogitsProcessors()(logits[:1], plain) is logits[:1] or torch.equal(LogitsProcessors()(logits[:1], plain), logits[:1])


def test_logit_bias_steers_the_sampler():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 3.0
    sampler = Sampler(torch.device("cpu"), 10)
    assert sampler(logits, [row(SamplingParams(temperature=0), [], "a")]).token_ids.tolist() == [4]
    biased = SamplingParams(temperature=0, logit_bias={4: -100.0, 8: 1.0})
    assert sampler(logits, [row(biased, [], "b")]).token_ids.tolist() == [8]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _decode_constrained(tokenizer, seed: int, device: str = "cpu", steps: int = 80) -> tuple[str, list[int], list[int]]:
    """Sample a grammar row next to an unconstrained greedy row on random logits; returns the
    grammar row's text, the plain row's tokens and the plain row's argmax reference."""
    vocab = 49152
    sampler = Sampler(torch.device(device), vocab, seed=seed)
    sampler.logits_processors = LogitsProcessors(tokenizer, EOS)
    g = torch.Generator().manual_seed(seed)
    structured = StructuredOutput("json", json.dumps(SCHEMA))
    constrained = SamplingParams(temperature=1.0, seed=seed, structured_output=structured, max_tokens=None)
    out_g: list[int] = []
    out_p: list[int] = []
    ref_p: list[int] = []
    for _ in range(steps):
        logits = (torch.randn(2, vocab, generator=g) * 3).to(device)
        rows = [row(constrained, out_g, "g"), row(SamplingParams(temperature=0), out_p, "p")]
        tokens = sampler(logits, rows).token_ids.tolist()
        out_p.append(tokens[1])
        ref_p.append(int(logits[1].argmax()))
        if tokens[0] in EOS:
            return tokenizer.decode(out_g), out_p, ref_p
        out_g.append(tokens[0])
    raise AssertionError(f"the grammar row did not end in {steps} steps: {tokenizer.decode(out_g)!r}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_grammar_row_always_yields_schema_json_and_other_rows_are_untouched(tokenizer, seed, device):
    text, plain, reference = _decode_constrained(tokenizer, seed, device)
    value = json.loads(text)
    assert set(value) == {"ok", "colour", "tag"}
    assert isinstance(value["ok"], bool) and value["colour"] in ("red", "green", "blue")
    assert isinstance(value["tag"], str) and len(value["tag"]) <= 6
    assert plain == reference


def test_grammar_tokenizer_reads_a_byte_level_vocabulary_under_a_sentencepiece_decoder_chain(tokenizer):
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with ByteFallback / Fuse / Replace
    around its byte-level decoder. The tokenizer still decodes right, but llguidance then read
    'Ġamount' as those letters, so masks allowed the wrong bytes (an H200 run emitted a raw
    0x15 inside a JSON string). ``grammar_tokenizer`` gives llguidance the byte-level step."""
    import copy

    import llguidance.hf
    from tokenizers import decoders

    from flashserve.layers.logits_processors import grammar_tokenizer

    hf = copy.deepcopy(getattr(tokenizer, "hf", tokenizer))
    hf.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "), decoders.ByteLevel()])
    ids = [207, 1902, 28]
    expected = [hf.decode([i]).encode() for i in ids]
    assert expected == [b"\x15", b" amount", b","]
    assert [llguidance.hf.from_tokenizer(hf, n_vocab=49152).decode_bytes([i]) for i in ids] != expected
    assert [grammar_tokenizer(hf, 49152, EOS).decode_bytes([i]) for i in ids] == expected


def test_state_is_a_cache_rebuilt_by_replaying_the_output(tokenizer):
    proc = LogitsProcessors(tokenizer, EOS)
    params = SamplingParams(structured_output=StructuredOutput("json", json.dumps(SCHEMA)))
    prefix = tokenizer.encode('{"ok":true,"col', add_special_tokens=False)
    logits = torch.randn(1, 49152, generator=torch.Generator().manual_seed(3))
    out: list[int] = []
    for t in prefix:  # advance step by step, as decoding does
        proc(logits, [row(params, out, "x")])
        out.append(t)
    cached = proc(logits, [row(params, out, "x")])
    proc._states.clear()  # evicted (or lost): rebuilt from the output tokens
    rebuilt = proc(logits, [row(params, out, "x")])
    assert torch.equal(cached, rebuilt)
    allowed = torch.isfinite(cached[0]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode(out + [t]).startswith('{"ok":true,"col') for t in allowed)
    assert any("our" in tokenizer.decode([t]) for t in allowed)


def test_a_row_that_left_its_grammar_is_ended_alone(tokenizer, caplog):
    proc = LogitsProcessors(tokenizer, EOS)
    params = SamplingParams(structured_output=StructuredOutput("json", json.dumps(SCHEMA)))
    bad_output = tokenizer.encode("hello world", add_special_tokens=False)
    logits = torch.randn(2, 49152, generator=torch.Generator().manual_seed(4))
    out = proc(logits, [row(params, bad_output, "bad"), row(SamplingParams(), [], "fine")])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == EOS
    assert torch.equal(out[1], logits[1])
    assert "left its grammar" in caplog.text


@pytest.mark.parametrize("structured,message", [
    (StructuredOutput("json", '{"type": "foo"}'), "not supported"),
    (StructuredOutput("json", "{not json"), "not valid"),
    (StructuredOutput("regex", "(unclosed"), "not supported"),
])
def test_malformed_constraints_are_refused(structured, message):
    with pytest.raises(ValueError, match=message):
        validate_structured_output(structured)
    validate_structured_output(StructuredOutput("regex", "[a-z]{3}"))
    validate_structured_output(StructuredOutput("json", json.dumps(SCHEMA)))


def test_parallel_and_inline_mask_fills_agree(tokenizer, monkeypatch):
    """With more than 2 CPUs llguidance's thread pool advances the matchers and fills the masks,
    for any number of rows (one included); on fewer, the calls run inline. Both give the same masks."""
    import flashserve.layers.logits_processors as lp

    params = SamplingParams(structured_output=StructuredOutput("json", json.dumps(SCHEMA)))
    prefixes = ['{"ok":', '{"ok":true,"colour":"', '{"ok":false,"colour":"red","tag":"ab', "", '{"ok":true,"col']
    outputs = [tokenizer.encode(prefixes[i % len(prefixes)], add_special_tokens=False) for i in range(10)]
    logits = torch.randn(10, 49152, generator=torch.Generator().manual_seed(5))

    def run(cpus: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of a first call, then of a call one token later (the matchers advance together)."""
        monkeypatch.setattr(lp.os, "cpu_count", lambda: cpus)
        proc = LogitsProcessors(tokenizer, EOS)
        first = proc(logits, [row(params, out[:-1], f"r{i}") for i, out in enumerate(outputs)])
        return first, proc(logits, [row(params, out, f"r{i}") for i, out in enumerate(outputs)])

    inline, parallel = run(1), run(16)
    assert all(torch.equal(a, b) for a, b in zip(inline, parallel))
    assert torch.equal(inline[1], LogitsProcessors(tokenizer, EOS)(logits, [row(params, out, f"r{i}")
                                                                             for i, out in enumerate(outputs)]))
    assert (torch.isfinite(inline[1]).sum(dim=1) < 49152).all()  # every row is constrained
    outputs, logits = outputs[2:3], logits[2:3]  # a single row
    one_inline, one_parallel = run(1), run(16)
    assert all(torch.equal(a, b) for a, b in zip(one_inline, one_parallel))
    assert torch.equal(one_parallel[1], parallel[1][2:3])


def test_prefetched_masks_equal_inline_ones_and_stale_ones_are_recomputed(tokenizer, monkeypatch):
    """prefetch() fills the next call's masks in a background thread; the call uses them only when
    its grammar rows and their outputs are those the prefetch saw."""
    import threading

    params = SamplingParams(structured_output=StructuredOutput("json", json.dumps(SCHEMA)))
    outputs = [tokenizer.encode(p, add_special_tokens=False) for p in ('{"ok":', '{"ok":true,"colour":"', "")]
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(6))
    rows = lambda outs: [row(params, outs[0], "a"), row(SamplingParams(), [], "plain"),  # noqa: E731
                         row(params, outs[1], "b"), row(params, outs[2], "c")]
    proc = LogitsProcessors(tokenizer, EOS)
    proc(logits, rows([o[:-1] for o in outputs[:2]] + [[]]))  # the rows' states exist, as after a step
    fills: list[str] = []
    fill = proc._fill_masks
    monkeypatch.setattr(proc, "_fill_masks", lambda *a: (fills.append(threading.current_thread().name), fill(*a))[1])

    switch = sys.getswitchinterval()
    proc.prefetch(rows(outputs), 49152)
    assert sys.getswitchinterval() < switch  # the thread gets the GIL soon while it fills
    prefetched = proc(logits, rows(outputs))
    assert sys.getswitchinterval() == switch
    assert len(fills) == 1 and fills[0].startswith("flashserve-grammar")  # filled by the thread only
    inline = LogitsProcessors(tokenizer, EOS)(logits, rows(outputs))
    assert torch.equal(prefetched, inline)
    assert torch.equal(prefetched[1], logits[1]) and (torch.isfinite(prefetched[0]) != torch.isfinite(prefetched[2])).any()

    longer = [o + tokenizer.encode("true", add_special_tokens=False) if i == 0 else o for i, o in enumerate(outputs)]
    proc.prefetch(rows(outputs), 49152)  # stale: the call below has one more output token in row "a"
    stale = proc(logits, rows(longer))
    assert fills[-1] == threading.current_thread().name  # recomputed inline
    assert torch.equal(stale, LogitsProcessors(tokenizer, EOS)(logits, rows(longer)))


@pytest.mark.parametrize("device", DEVICES)
def test_grammar_rows_in_the_overlapped_engine_loop(device):
    """Grammars through the Worker: the overlapped loop (step N+1 launched before step N's tokens
    are read) gives the same tokens as the serial loop, outputs follow the schema, and the plain
    requests beside them are token-identical to a run without grammars."""
    from flashserve.engine.llm import LLM

    structured = StructuredOutput("json", json.dumps(SCHEMA))
    prompts = ["Describe a flag as JSON:", "Once upon a time", "Give me a colour in JSON:", "The capital of France is"]
    grammar = SamplingParams(temperature=0.8, seed=3, max_tokens=40, structured_output=structured)
    plain = SamplingParams(temperature=0, max_tokens=12)
    params = [grammar, plain, grammar, plain]
    runs = {}
    for overlap in (True, False):
        llm = LLM(device=device, max_model_len=256, kv_cache_bytes=20_000_000, verbose=False, async_scheduling=overlap)
        runs[overlap] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if overlap:
            texts = [o.text for o in llm.generate(prompts, params, use_tqdm=False)]
            alone = [o.token_ids for o in llm.generate(prompts[1::2], plain, use_tqdm=False)]
    assert runs[True] == runs[False]
    for text in texts[0::2]:
        value = json.loads(text)
        assert set(value) == {"ok", "colour", "tag"} and value["colour"] in ("red", "green", "blue")
    assert runs[True][1::2] == alone
