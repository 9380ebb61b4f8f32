"""EngineArgs: one definition gives the LLM keywords and the CLI flags; dummy weights with a real
tokenizer; ``python -m flashserve``."""

import argparse
import json
import subprocess
import sys
from dataclasses import fields

import pytest

from flashserve import LLM, SamplingParams
from flashserve.config import EngineArgs
from flashserve.loader import default_model_path


def test_every_field_is_a_cli_flag_with_its_default():
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    ns = p.parse_args([])
    assert EngineArgs.from_cli(ns) == EngineArgs()
    ns = p.parse_args(["--max-num-seqs", "7", "--no-prefix-caching", "--no-chunked-prefill", "--policy", "sjf",
                       "--kv-cache-memory-fraction", "0.5", "--executor", "process", "--no-async-scheduling"])
    args = EngineArgs.from_cli(ns)
    assert (args.max_num_seqs, args.enable_prefix_caching, args.enable_chunked_prefill, args.policy) == (7, False, False, "sjf")
    assert args.kv_cache_memory_fraction == 0.5 and args.executor == "process" and not args.async_scheduling
    cfg = args.engine_config()
    assert cfg.scheduler.max_num_seqs == 7 and not cfg.cache.enable_prefix_caching
    helps = {a.dest: a.help for a in p._actions if a.dest != "help"}
    assert set(helps) == {f.name for f in fields(EngineArgs)} and all(helps.values())
    with pytest.raises(SystemExit):
        p.parse_args(["--policy", "random"])


def test_unknown_llm_keyword_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) max_seqs; valid options: .*max_num_seqs"):
        LLM(max_seqs=3)
    with pytest.raises(ValueError, match="executor must be inproc or process"):
        EngineArgs(executor="ray").engine_config()


@pytest.fixture(scope="module")
def dummy_dir(tmp_path_factory):
    """A tiny Llama config with SmolLM2's vocabulary, for dummy weights."""
    folder = tmp_path_factory.mktemp("dummy_smol_vocab")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_dummy_weights_with_a_real_tokenizer_take_text(dummy_dir):
    llm = LLM(dummy_dir, load_format="dummy", tokenizer=default_model_path(), device="cpu", max_model_len=256,
              kv_cache_bytes=8 << 20, verbose=False)
    out = llm.generate(["Hello there, how are you?"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) == 8 and out.prompt_token_ids == llm.tokenizer.encode("Hello there, how are you?")
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="has no tokenizer"):
        LLM(dummy_dir, load_format="dummy", device="cpu", max_model_len=256, kv_cache_bytes=8 << 20,
            verbose=False).generate(["text"], use_tqdm=False)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
               intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="the tokenizer has 49152 tokens but the model's vocabulary is 512"):
        LLM(str(tmp_path), load_format="dummy", tokenizer=default_model_path(), device="cpu", verbose=False)


def test_python_dash_m_flashserve_works():
    r = subprocess.run([sys.executable, "-m", "flashserve", "generate", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--max-num-seqs" in r.stdout and "--tokenizer" in r.stdout
