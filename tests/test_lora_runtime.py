"""LoRA adapters loaded and removed while an engine serves (``LLM.add_lora`` / ``remove_lora``,
``max_loras`` slots): a loaded adapter gives PEFT's greedy tokens beside the base model and the
other slots, in the engine's process, in a Worker process and on tensor- and pipeline-parallel
ranks (gloo); a name loaded again with other weights shares no cached K/V with the one before;
an adapter in use cannot be removed; every refusal names the problem and leaves the engine
serving with its slots as they were."""

from __future__ import annotations

import pytest

from conftest_lora import greedy_tokens, load_base, peft_oracle, write_peft_adapter
from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.lora.registry import LoRAStats
from test_engine import prompts

NEW = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base model folder, {adapter name: folder}): 'all' adapts every projection at rank 8, 'qv'
    q and v at rank 4 (rsLoRA), 'r16' every projection at rank 16."""
    base = tmp_path_factory.mktemp("lora_rt_base")
    make_tiny_checkpoint("llama3_gqa", base, seed=3)
    adapters = {"all": write_peft_adapter(base, tmp_path_factory.mktemp("rt_all"), seed=1, r=8, alpha=16),
                "qv": write_peft_adapter(base, tmp_path_factory.mktemp("rt_qv"), seed=2, r=4, alpha=4,
                                         targets=("q_proj", "v_proj"), use_rslora=True),
                "r16": write_peft_adapter(base, tmp_path_factory.mktemp("rt_r16"), seed=3, r=16, alpha=16)}
    return str(base), {k: str(v) for k, v in adapters.items()}


@pytest.fixture(scope="module")
def oracles(tiny):
    base, adapters = tiny
    return {None: load_base(base), **{name: peft_oracle(base, adapters[name]) for name in ("all", "qv")}}


def _engine(tiny, **kw) -> LLM:
    args = dict(model=tiny[0], device="cpu", block_size=4, max_model_len=128, kv_cache_bytes=8 << 20, verbose=False,
                max_loras=2, max_lora_rank=8)
    return LLM(**{**args, **kw})


def _params(lora=None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, lora=lora)


def _generate(llm: LLM, batch: list[list[int]], names: list[str | None]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(batch, [_params(n) for n in names], use_tqdm=False)]


def test_adapters_loaded_and_removed_while_serving_match_peft(tiny, oracles):
    base, adapters = tiny
    llm = _engine(tiny)
    batch = prompts(3, seed=31, lo=6, hi=30)
    want = {name: [greedy_tokens(model, p, NEW) for p in batch] for name, model in oracles.items()}
    assert _generate(llm, batch, [None] * 3) == want[None]
    llm.add_lora("all", adapters["all"])
    assert llm.engine.lora_names == ("all",)
    assert _generate(llm, batch, ["all", None, "all"]) == [want["all"][0], want[None][1], want["all"][2]]
    llm.add_lora("qv", adapters["qv"])
    assert _generate(llm, batch, ["qv", "all", None]) == [want["qv"][0], want["all"][1], want[None][2]]
    with pytest.raises(ValueError, match=r"serves 2 LoRA adapters at most \('all', 'qv'\); remove one.*max_cpu_loras"):
        llm.add_lora("third", adapters["qv"])
    llm.remove_lora("all")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'all'; this engine serves 'qv'"):
        llm.generate(batch[:1], _params("all"), use_tqdm=False)
    assert _generate(llm, batch, ["qv", None, "qv"]) == [want["qv"][0], want[None][1], want["qv"][2]]
    llm.add_lora("all", adapters["all"])  # into the freed slot
    assert _generate(llm, batch, ["all", "qv", None]) == [want["all"][0], want["qv"][1], want[None][2]]


def test_a_name_loaded_again_shares_no_cached_kv(tiny, oracles):
    """'x' is first the q/v adapter, then (removed and loaded again) the other: its requests after
    the reload compute their own K/V and give the new adapter's tokens."""
    base, adapters = tiny
    llm = _engine(tiny)
    prompt = prompts(1, seed=32, lo=32, hi=32)[0]
    llm.add_lora("x", adapters["qv"])
    first = llm.generate([prompt], _params("x"), use_tqdm=False)[0]
    again = llm.generate([prompt], _params("x"), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and first.token_ids == again.token_ids == greedy_tokens(oracles["qv"], prompt,
                                                                                               NEW)
    llm.remove_lora("x")
    llm.add_lora("x", adapters["all"])
    reloaded = llm.generate([prompt], _params("x"), use_tqdm=False)[0]
    assert reloaded.num_cached_tokens == 0 and reloaded.token_ids == greedy_tokens(oracles["all"], prompt, NEW)


def test_an_adapter_in_use_is_not_removed(tiny, oracles):
    base, adapters = tiny
    llm = _engine(tiny)
    llm.add_lora("all", adapters["all"])
    engine = llm.engine
    prompt = prompts(1, seed=33, lo=10, hi=10)[0]
    engine.add_request("busy", prompt, _params("all"))
    engine.step()
    with pytest.raises(ValueError, match=r"LoRA adapter 'all' is in use by 1 unfinished request\(s\)"):
        llm.remove_lora("all")
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    assert out.outputs[0].token_ids == greedy_tokens(oracles["all"], prompt, NEW)
    llm.remove_lora("all")
    assert engine.lora_names == ()


def test_refused_adapters_leave_the_engine_serving(tiny, oracles, tmp_path):
    base, adapters = tiny
    llm = _engine(tiny, max_loras=1)
    prompt = prompts(1, seed=34, lo=8, hi=8)[0]
    with pytest.raises(ValueError, match=r"'r16' has rank 16, above this engine's max_lora_rank 8"):
        llm.add_lora("r16", adapters["r16"])
    other = tmp_path / "other"
    make_tiny_checkpoint("llama3_gqa", other, seed=4, intermediate_size=96)
    wrong = write_peft_adapter(other, tmp_path / "wrong", seed=1, targets=("down_proj",))
    with pytest.raises(ValueError, match=r"'wrong'.*down_proj has A \(4, 96\).*another model"):
        llm.add_lora("wrong", str(wrong))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llm.add_lora("gone", str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="unknown LoRA adapter 'none'"):
        llm.remove_lora("none")
    assert llm.engine.lora_names == ()  # the slot is still free
    llm.add_lora("qv", adapters["qv"])
    with pytest.raises(ValueError, match="a LoRA adapter named 'qv' is already served"):
        llm.add_lora("qv", adapters["all"])
    assert llm.generate([prompt], _params("qv"), use_tqdm=False)[0].token_ids == \
        greedy_tokens(oracles["qv"], prompt, NEW)


def test_engines_without_room_say_how_to_get_it(tiny):
    base, adapters = tiny
    plain = LLM(model=base, device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=8 << 20, verbose=False)
    with pytest.raises(ValueError, match="no LoRA adapter slots; start it with max_loras"):
        plain.add_lora("all", adapters["all"])
    # started with 'qv' alone and no max_loras: one slot, adapting q and v only
    fixed = LLM(model=base, device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=8 << 20, verbose=False,
                lora_modules={"qv": adapters["qv"]}, max_lora_rank=8)
    with pytest.raises(ValueError, match="serves 1 LoRA adapters at most"):
        fixed.add_lora("all", adapters["all"])
    fixed.remove_lora("qv")
    with pytest.raises(ValueError, match=r"modules this engine does not adapt: .*down_proj.*with max_loras it adapts "
                                         "every attention and MLP projection"):
        fixed.add_lora("all", adapters["all"])
    with pytest.raises(ValueError, match="max_loras without lora_modules needs max_lora_rank"):
        LLM(model=base, device="cpu", verbose=False, max_loras=2)
    with pytest.raises(ValueError, match="max_loras=1 must be at least 1 and hold the 3 adapters of lora_modules"):
        LLM(model=base, device="cpu", verbose=False, max_loras=1, lora_modules=adapters)


def test_more_adapters_than_slots_take_turns(tiny, oracles):
    """One slot, two adapters served (``max_cpu_loras=2``): requests of the adapter not in the slot
    wait until the slot's adapter has no unfinished request, then it moves in; every request gets
    PEFT's tokens for its adapter, base-model requests never wait, later requests wait behind an
    earlier one (arrival order), and the wait ends for an aborted request too."""
    base, adapters = tiny
    llm = _engine(tiny, max_loras=1, max_cpu_loras=2)
    llm.add_lora("all", adapters["all"])
    llm.add_lora("qv", adapters["qv"])  # served from host memory until a request needs it
    assert llm.engine.lora.slots == ["all"]
    batch = prompts(5, seed=36, lo=6, hi=24)
    names = ["all", "qv", None, "all", "qv"]
    outs = llm.generate(batch, [_params(n) for n in names], use_tqdm=False)
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name
    assert llm.engine.lora.slots == ["qv"] and not llm.engine.lora.waiting
    engine = llm.engine
    engine.add_request("q", batch[0], _params("qv"))
    engine.add_request("a", batch[1], _params("all"))  # waits: 'qv' runs in the slot
    engine.add_request("q2", batch[2], _params("qv"))  # waits behind 'a', though 'qv' is in the slot
    engine.add_request("b", batch[3], _params(None))
    assert [r.request_id for r in engine.lora.waiting] == ["a", "q2"]
    assert engine.stats().num_waiting == 4  # two in the scheduler, two for a slot
    assert engine.stats().lora == LoRAStats(adapters=2, slots=1, slots_used=1, waiting=2)
    with pytest.raises(ValueError, match=r"'all' is in use by 1 unfinished request"):
        llm.remove_lora("all")
    assert engine.abort_request("a")
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert sorted(done) == ["b", "q", "q2"] and not engine.lora.waiting
    assert done["q2"] == greedy_tokens(oracles["qv"], batch[2], NEW)
    assert done["b"] == greedy_tokens(oracles[None], batch[3], NEW)
    with pytest.raises(ValueError, match="serves 2 LoRA adapters at most"):
        llm.add_lora("r16", adapters["r16"])
    # a beam search starts only with its adapter in a slot
    from flashserve.spec.beam import BeamSearchParams

    engine.add_request("busy", batch[0], _params("qv"))
    with pytest.raises(ValueError, match="beam search needs LoRA adapter 'all' in a slot"):
        engine.add_beam_request("beam", batch[1], BeamSearchParams(beam_width=2, max_tokens=4, lora="all"))
    while engine.has_unfinished_requests():
        engine.step()
    beams = llm.beam_search([batch[1]], BeamSearchParams(beam_width=2, max_tokens=4, lora="all"), use_tqdm=False)
    assert engine.lora.slots == ["all"] and len(beams[0].outputs) == 2


@pytest.mark.slow  # starts Worker processes
@pytest.mark.parametrize("mode", [dict(executor="process"), dict(tensor_parallel_size=2),
                                  dict(pipeline_parallel_size=2), dict(disaggregated=True)],
                         ids=["process", "tp2", "pp2", "disaggregated"])
def test_other_processes_load_and_refuse_adapters(tiny, oracles, mode):
    """A Worker in its own process, every tensor- or pipeline-parallel rank, and both Workers of a
    disaggregated engine (the prompt's K/V computed with the adapter on the prefill side) load the
    adapter (its slice, its stage's layers), swap adapters through their one slot between steps,
    and every one of them refuses an adapter it cannot take."""
    base, adapters = tiny
    llm = _engine(tiny, max_loras=1, max_cpu_loras=2, **mode)
    batch = prompts(4, seed=35, lo=6, hi=20)
    with pytest.raises(ValueError, match="above this engine's max_lora_rank 8"):
        llm.add_lora("r16", adapters["r16"])
    llm.add_lora("all", adapters["all"])
    llm.add_lora("qv", adapters["qv"])
    names = ["all", "qv", None, "all"]
    assert _generate(llm, batch, names) == [greedy_tokens(oracles[n], p, NEW) for p, n in zip(batch, names)]
    llm.remove_lora("all")
    assert _generate(llm, batch[:2], [None, "qv"]) == [greedy_tokens(oracles[None], batch[0], NEW),
                                                       greedy_tokens(oracles["qv"], batch[1], NEW)]
    llm.engine.shutdown()
