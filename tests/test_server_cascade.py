"""``flashserve serve --cascade`` end to end: a real server process with two tiny real models that
share SmolLM2's tokenizer (a 2-layer random Llama and its 1-layer student), driven by the official
``openai`` client. The threshold is set between the small model's confidences on the prompts (as
computed in-process by ``LLM(cascade=...)``), so some requests must be answered by each model;
every answer must be that model's own, the ``model`` field must name it, and /metrics must count
what ran. Streaming, n > 1 and several prompts are refused with a 400 naming the limit."""

from __future__ import annotations

import re

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from compress_models import tiny_smollm_vocab  # noqa: E402
from flashserve import LLM, SamplingParams  # noqa: E402
from flashserve.compress.distill import make_student  # noqa: E402
from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir  # noqa: E402
from flashserve.engine.cascade import ConfidenceRule  # noqa: E402
from flashserve.server.testing import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ENGINE = dict(device="cpu", max_model_len=256, kv_cache_bytes=8 << 20)
MAX_TOKENS = 6
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite colour is",
           "Water boils at", "The quick brown fox"]
CHAT = [{"role": "user", "content": "Name a planet."}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(small dir, large dir): a 2-layer model with SmolLM2's tokenizer and its 1-layer student."""
    large = tmp_path_factory.mktemp("large")
    tiny_smollm_vocab(large, layers=2, seed=5)
    src = load_source(str(large))
    small = tmp_path_factory.mktemp("small")
    write_model_dir(small, hf_state_dict(make_student(src.model, [1]).eval()),
                    {**src.config_json, "num_hidden_layers": 1}, src.tokenizer)
    return str(small), str(large)


@pytest.fixture(scope="module")
def expected(dirs):
    """In-process answers: (small's confidence, small's text, large's text) per prompt, and the chat's."""
    small_dir, large_dir = dirs
    llm = LLM(large_dir, cascade=small_dir, cascade_rule=ConfidenceRule("mean_logprob", 0.0), verbose=False, **ENGINE)
    probe = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    large = llm.cascade.large.generate(PROMPTS, PARAMS, use_tqdm=False)
    chat_small = llm.chat(CHAT, PARAMS, use_tqdm=False)[0]
    chat_large = llm.cascade.large.chat(CHAT, PARAMS, use_tqdm=False)[0]
    rows = [(o.confidence, o.output.outputs[0].text, g.outputs[0].text) for o, g in zip(probe, large)]
    chat = (chat_small.confidence, chat_small.output.outputs[0].text, chat_large.outputs[0].text)
    return rows, chat


@pytest.fixture(scope="module")
def threshold(expected):
    """Halfway across the widest gap between the middle confidences: some answers each way, far
    from any confidence (so float noise between runs cannot flip a decision)."""
    rows, chat = expected
    conf = sorted({c for c, _, _ in rows} | {chat[0]})
    lo, hi = max(((a, b) for a, b in zip(conf[1:-2], conf[2:-1])), key=lambda ab: ab[1] - ab[0])
    assert hi - lo > 1e-3 * hi, conf  # distinct enough to split
    return (lo + hi) / 2


@pytest.fixture(scope="module")
def server(dirs, threshold):
    small_dir, large_dir = dirs
    proc = ServerProcess(["--model", large_dir, "--cascade", small_dir, "--cascade-threshold", repr(threshold),
                          "--device", "cpu", "--max-model-len", "256", "--kv-cache-bytes", str(8 << 20),
                          "--log-level", "warning"])
    with proc:
        yield proc
    assert proc.returncode == 0, proc.read_log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def cascade_metrics(server: ServerProcess) -> dict[tuple[str, str], float]:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    return {(kind, model): float(v) for kind, model, v in
            re.findall(r'^flashserve_cascade_(answers|tokens)_total\{model="(small|large)"\} (\S+)$', text, re.M)}


def test_answers_come_from_the_model_the_rule_picks(server, client, dirs, expected, threshold):
    small_dir, large_dir = dirs
    rows, chat = expected
    assert cascade_metrics(server) == {(k, m): 0.0 for k in ("answers", "tokens") for m in ("small", "large")}
    totals = {"small": 0, "large": 0}  # tokens each model computed
    answered = {"small": 0, "large": 0}
    for prompt, (conf, small_text, large_text) in zip(PROMPTS, rows):
        r = client.completions.create(model=large_dir, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
        which = "small" if conf >= threshold else "large"
        assert r.model == (small_dir if which == "small" else large_dir)
        assert r.choices[0].text == (small_text if which == "small" else large_text)
        assert r.model_extra["cascade"]["model"] == which
        assert r.model_extra["cascade"]["confidence"] == pytest.approx(conf, rel=1e-4)
        answered[which] += 1
        totals["small"] += r.usage.total_tokens  # the small model runs every request, same lengths (ignore_eos)
        totals["large"] += r.usage.total_tokens if which == "large" else 0
    assert answered["small"] and answered["large"]  # the threshold splits the prompts
    c = client.chat.completions.create(model=large_dir, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"ignore_eos": True})
    which = "small" if chat[0] >= threshold else "large"
    assert c.model == (small_dir if which == "small" else large_dir)
    assert c.choices[0].message.content == (chat[1] if which == "small" else chat[2])
    answered[which] += 1
    totals["small"] += c.usage.total_tokens
    totals["large"] += c.usage.total_tokens if which == "large" else 0
    assert cascade_metrics(server) == {("answers", "small"): answered["small"], ("answers", "large"): answered["large"],
                                       ("tokens", "small"): totals["small"], ("tokens", "large"): totals["large"]}


def test_cascade_limits_are_clear_400s(server, client, dirs):
    large_dir = dirs[1]
    with pytest.raises(openai.BadRequestError, match="stream is not supported by this server's cascade"):
        client.completions.create(model=large_dir, prompt=PROMPTS[0], max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="stream is not supported by this server's cascade"):
        client.chat.completions.create(model=large_dir, messages=CHAT, max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="n must be 1, got 2"):
        client.completions.create(model=large_dir, prompt=PROMPTS[0], max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="one prompt per request, got 2"):
        client.completions.create(model=large_dir, prompt=PROMPTS[:2], max_tokens=4)
    r = httpx.post(server.url("/v1/completions"), json={"prompt": PROMPTS[0], "stream": True}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_serve_refuses_a_bad_cascade_at_start(dirs, tmp_path):
    import subprocess
    import sys

    from conftest_models import make_tiny_checkpoint

    small_dir, large_dir = dirs
    make_tiny_checkpoint("llama_mha_tied", tmp_path / "other", seed=1)  # no tokenizer, another vocabulary

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flashserve.cli", "serve", "--device", "cpu", "--max-model-len", "64",
                               "--kv-cache-bytes", str(1 << 20), *args], capture_output=True, text=True, timeout=120)

    r = serve("--model", large_dir, "--cascade", small_dir, "--cascade-threshold", "1.5")
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "error: cascade threshold must be in [0, 1] (0: always the small model, 1: always the large), got 1.5"), r.stderr
    r = serve("--model", str(tmp_path / "other"), "--cascade", small_dir)
    assert r.returncode == 2 and "the small and large models have different vocabularies" in r.stderr, r.stderr[-2000:]
