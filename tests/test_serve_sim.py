"""serve-sim: a small trace through the real engine (tiny dummy model, CPU) for every policy."""

import argparse
import json

from flashserve.bench import serve_sim


def test_serve_sim_runs_every_policy_and_writes_json(tmp_path):
    p = argparse.ArgumentParser()
    serve_sim.add_arguments(p)
    out = tmp_path / "sim.json"
    args = p.parse_args(["--num-requests", "8", "--rate", "50", "--output-max", "24", "--long-prompt", "96",
                         "--long-prompt-frac", "0.3", "--max-num-seqs", "2", "--max-num-batched-tokens", "32",
                         "--policies", "fcfs,priority,sjf,mlfq", "--json", str(out)])
    assert serve_sim.run(args) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["fcfs", "priority", "sjf", "mlfq"]
    for r in data["results"]:
        assert r["num_requests"] == 8 and r["ttft_p99"] >= r["ttft_p50"] > 0 and r["jct_mean"] >= r["ttft_mean"]


def test_trace_is_heavy_tailed_and_clipped():
    p = argparse.ArgumentParser()
    serve_sim.add_arguments(p)
    args = p.parse_args(["--num-requests", "2000", "--shared-prefix", "4"])
    trace = serve_sim.make_trace(args, vocab=100, rate=10.0)
    outs = sorted(t.output_len for t in trace)
    assert outs[0] >= args.output_min and outs[-1] == args.output_max
    assert outs[len(outs) // 2] < 2 * args.output_min  # median near the scale, tail up to the clip
    assert all(t.prompt[:4] == trace[0].prompt[:4] for t in trace)
    assert all(a.arrival < b.arrival for a, b in zip(trace, trace[1:]))
