"""``flashserve bench latency``'s kernel table (``--profile``): the decode steps' kernels are the
longer run's less the prompt-only run's, per step, sorted by time; the gaps are the span less them."""

from flashserve.bench.latency import format_profile, step_kernels


def test_step_kernels_subtract_the_prompt_run():
    prompt_only = {"gemv": [5.0, 7.0], "prefill_attn": [30.0]}
    both = {"gemv": [5.0, 7.0, 4.0, 4.5, 3.5, 4.0], "prefill_attn": [30.0], "norm": [1.0, 1.5], "argmax": [2.0]}
    table = step_kernels(both, span=100.0, prompt_only=prompt_only, prompt_span=60.0, steps=2)
    rows = {r["kernel"]: r for r in table["kernels"]}
    assert set(rows) == {"gemv", "norm", "argmax"}  # the prompt's attention ran in both runs alone
    assert rows["gemv"] == {"kernel": "gemv", "calls_per_step": 2.0, "us_per_call": 4.0, "us_per_step": 8.0}
    assert rows["norm"]["us_per_step"] == 1.25 and rows["argmax"]["calls_per_step"] == 0.5
    assert [r["kernel"] for r in table["kernels"]] == ["gemv", "norm", "argmax"]
    assert table["kernel_us_per_step"] == 10.25 and table["kernels_per_step"] == 3.5
    assert table["span_us_per_step"] == 20.0 and table["idle_us_per_step"] == 9.75
    text = format_profile(table)
    assert text.splitlines()[1].startswith("gemv") and "3 kernels" not in text and "4 kernels" in text


def test_latency_bench_reports_per_model_step_with_multi_step_plans(tmp_path):
    """With ``--num-scheduler-steps`` a plan runs several model steps: the host time is reported per
    model step, over the decode plans."""
    import json

    from flashserve.cli import main

    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--device", "cpu", "--model", "tiny-llama", "--load-format", "dummy",
                 "--new-tokens", "17", "--repeats", "1", "--max-model-len", "128", "--prompt-len", "8",
                 "--num-scheduler-steps", "4", "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["host_ms_per_decode_step"] > 0 and res["new_tokens"] == 17
