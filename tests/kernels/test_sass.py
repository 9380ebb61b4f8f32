"""``kernels.sass``: the hottest loop of a kernel's SASS, and ``bench gemv --sass`` compiling the
GEMV rule tiles for sm_90 on a host without a GPU (in a subprocess: this session's Triton runs in
its interpreter, which keeps no kernels to compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashserve.kernels import quant_gemv, sass

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   FFMA R8, R4, R5, R8 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   LOP3.LUT R9, R4, 0xf0000, RZ, 0xc0, !PT ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   STS [R5], R8 ;
        /*0070*/              @!P1 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_3);
.L_x_3:
"""


def test_loop_profile_takes_the_longest_loop_and_counts_base_opcodes():
    prof = sass.loop_profile(SASS, registers=40)
    assert prof.instructions == 7  # .L_x_0 to its branch, the inner loop inside it
    assert prof.opcodes == {"LDG": 1, "FFMA": 1, "BRA": 2, "LOP3": 1, "BAR": 1, "STS": 1}
    assert (prof.barriers, prof.shared_stores, prof.registers) == (1, 1, 40)
    assert sass.loop_profile("        /*0000*/                   EXIT ;\n") is None  # no backward branch


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels compile here: nothing to refuse")
def test_capture_refuses_an_interpreted_kernel():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with sass.captured_launches(quant_gemv, "_gemv_byte_kernel"):
            pass
    assert not isinstance(quant_gemv._gemv_byte_kernel, sass._Recorder)


def test_bench_gemv_sass_compiles_every_format_for_sm90(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "flashserve", "bench", "gemv", "--sass", "--formats", "bf16,int8,fp8,int4",
           "--shapes", "a=256x1024,d=512x8192:gated", "--output-json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {(r["format"], r["product"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8
    for (fmt, product), row in rows.items():
        loop = row["loop"]
        assert loop["instructions"] > 0 and loop["registers"] > 0, (fmt, product)
        assert loop["warp_instructions_per_1k_weights"] > 0
    int4 = rows["int4", "a"]["loop"]["opcodes"]
    assert int4["LOP3"] >= 8 and int4["FFMA"] > 0  # a LOP3 per nibble into the float, then its FMA
    assert "/" in rows["int8", "d"]["tile"]  # K = 8192: a long row, split
    assert rows["int8", "d"]["gated"]


QUEST_COMPILE = """
import torch
from flashserve.kernels import quest, sass
from flashserve.kernels.cache_ops import store_kv_args
B, Hkv, D, bs, P = 2, 8, 128, 16, 600
bounds = torch.randn(B * P + 1, 2, Hkv, D, dtype=torch.bfloat16)
tables = torch.arange(B * P, dtype=torch.int32).view(B, P)
lens = torch.tensor([P * bs, 100], dtype=torch.int32)
cache = torch.randn(B * P, bs, Hkv, D, dtype=torch.bfloat16)
k = torch.randn(B, Hkv, D, dtype=torch.bfloat16)
store = store_kv_args(k, k, cache, cache, torch.tensor([5, 17]), bounds)
with sass.captured_launches(quest, "_quest_select_kernel") as launches:
    quest.quest_select(torch.randn(B, Hkv, P), tables, lens, bs, 0.2, 4, 120, store=store)
print(sass.disassemble(sass.compile_launch(launches[0]))[1])
"""


def test_a_launch_with_tuple_arguments_compiles_for_sm90():
    """Quest's selection launch with the K/V store: ``store_token``'s arguments are a tuple
    (tensors and integers), which the compile types element by element."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", QUEST_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 0 < int(res.stdout.split()[-1]) <= 128  # registers per thread: 16 warps fit an SM
