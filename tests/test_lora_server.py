"""LoRA adapters over HTTP: a ``flashserve serve --lora-modules`` process driven by the official
``openai`` client. Each adapter is a model of its own name (listed by /v1/models with the base
model as parent); a completion or chat for it gives the text ``LLM`` gives with
``SamplingParams(lora=...)``; an unknown model name is a 404 naming the served ones. With
``--allow-runtime-lora-updates`` adapters are loaded and unloaded over HTTP."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (openai's own HTTP client)

from conftest_lora import write_peft_adapter  # noqa: E402
from conftest_models import copy_smollm2_tokenizer, make_tiny_checkpoint  # noqa: E402
from flashserve import LLM, SamplingParams  # noqa: E402
from flashserve.server.testing import ServerProcess  # noqa: E402

PROMPT = "The quick brown fox"


def test_adapters_are_models_of_their_own(tmp_path):
    base = tmp_path / "base"
    make_tiny_checkpoint("llama3_gqa", base, seed=3, vocab_size=49152)
    copy_smollm2_tokenizer(base)
    adapters = {"sql": write_peft_adapter(base, tmp_path / "sql", seed=1, r=8, alpha=16),
                "chat": write_peft_adapter(base, tmp_path / "chat", seed=2, targets=("q_proj", "v_proj"))}
    kw = dict(device="cpu", block_size=4, max_model_len=128, kv_cache_bytes=8 << 20)
    llm = LLM(model=str(base), verbose=False, lora_modules={k: str(v) for k, v in adapters.items()}, **kw)
    want = {name: llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, lora=name),
                               use_tqdm=False)[0].text for name in ("sql", "chat", None)}
    assert len(set(want.values())) == 3  # each adapter changes the text
    chat_want = llm.chat([{"role": "user", "content": "Hi"}],
                         SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora="chat"))[0].text

    args = ["--model", str(base), "--served-model-name", "tiny", "--device", "cpu", "--block-size", "4",
            "--max-model-len", "128", "--kv-cache-bytes", str(8 << 20),
            "--lora-modules", *(f"{k}={v}" for k, v in adapters.items())]
    with ServerProcess(args) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny", "sql", "chat"]
        assert [getattr(m, "parent", None) for m in models] == [None, "tiny", "tiny"]
        assert client.models.retrieve("sql").id == "sql"
        for name, model in (("sql", "sql"), ("chat", "chat"), (None, "tiny")):
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.model == model and out.choices[0].text == want[name], name
        stream = client.completions.create(model="sql", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert {c.model for c in chunks} == {"sql"} and "".join(c.choices[0].text for c in chunks) == want["sql"]
        chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        assert chat.model == "chat" and chat.choices[0].message.content == chat_want
        with pytest.raises(openai.NotFoundError, match="'nope' does not exist; this server serves 'tiny', 'sql', 'chat'"):
            client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
        assert client.completions.create(model="sql", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text == want["sql"]
        # loading while serving is off unless asked for
        refused = httpx.post(server.url("/v1/load_lora_adapter"), json={"lora_name": "x", "lora_path": str(base)})
        assert refused.status_code == 403 and "--allow-runtime-lora-updates" in refused.json()["error"]["message"]


def test_adapters_loaded_and_unloaded_over_http(tmp_path):
    """``--allow-runtime-lora-updates``: POST /v1/load_lora_adapter serves an adapter as a model
    (listed, and answering as ``LLM`` answers with it), /v1/unload_lora_adapter stops it; refusals
    are 4xx errors naming the problem, and the server keeps serving."""
    base = tmp_path / "base"
    make_tiny_checkpoint("llama3_gqa", base, seed=3, vocab_size=49152)
    copy_smollm2_tokenizer(base)
    sql = write_peft_adapter(base, tmp_path / "sql", seed=1, r=8, alpha=16)
    big = write_peft_adapter(base, tmp_path / "big", seed=2, r=16, alpha=16)
    kw = dict(device="cpu", block_size=4, max_model_len=128, kv_cache_bytes=8 << 20)
    llm = LLM(model=str(base), verbose=False, lora_modules={"sql": str(sql)}, **kw)
    want = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, lora="sql"),
                        use_tqdm=False)[0].text
    args = ["--model", str(base), "--served-model-name", "tiny", "--device", "cpu", "--block-size", "4",
            "--max-model-len", "128", "--kv-cache-bytes", str(8 << 20), "--max-loras", "1", "--max-lora-rank", "8",
            "--allow-runtime-lora-updates"]
    with ServerProcess(args) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")

        def post(path: str, **body) -> httpx.Response:
            return httpx.post(server.url(f"/v1/{path}"), json=body, timeout=60)

        assert [m.id for m in client.models.list().data] == ["tiny"]
        loaded = post("load_lora_adapter", lora_name="sql", lora_path=str(sql))
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
        metrics = httpx.get(server.url("/metrics")).text
        for line in ("flashserve_lora_adapters 1.0", "flashserve_lora_slots 1.0", "flashserve_lora_slots_used 1.0",
                     "flashserve_lora_requests_waiting 0.0"):
            assert line in metrics, line
        assert [m.id for m in client.models.list().data] == ["tiny", "sql"]
        out = client.completions.create(model="sql", prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        for body, status, message in [
                (dict(lora_name="big", lora_path=str(big)), 400, "serves 1 LoRA adapters at most"),
                (dict(lora_name="sql", lora_path=str(sql)), 400, "named 'sql' is already served"),
                (dict(lora_name="tiny", lora_path=str(sql)), 400, "the base model's name"),
                (dict(lora_name="x"), 400, "missing required field 'lora_path'")]:
            refused = post("load_lora_adapter", **body)
            assert refused.status_code == status and message in refused.text, (body, refused.text)
        assert post("unload_lora_adapter", lora_name="sql").json()["status"] == "unloaded"
        with pytest.raises(openai.NotFoundError, match="'sql' does not exist"):
            client.completions.create(model="sql", prompt=PROMPT, max_tokens=4)
        assert post("unload_lora_adapter", lora_name="sql").status_code == 400
        refused = post("load_lora_adapter", lora_name="x", lora_path=str(tmp_path / "gone"))
        assert refused.status_code == 404 and "does not exist" in refused.text
        refused = post("load_lora_adapter", lora_name="big", lora_path=str(big))
        assert refused.status_code == 400 and "rank 16, above this engine's max_lora_rank 8" in refused.text
        assert post("load_lora_adapter", lora_name="sql2", lora_path=str(sql)).status_code == 200
        out = client.completions.create(model="sql2", prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
