"""Per-request attention options in one batch (flashserve.layers.request_attention): the Triton
backend, which launches its kernels once per option over that option's sequences, and the torch
backend, which attends sequence by sequence, against the torch backend run with each option as the
layer's own spec on that sequence alone (interpreter on CPU)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kernel_test_utils import PagedBatch

from flashserve.config import AttentionSpec
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.layers.request_attention import option_batches

OPTIONS = [None, AttentionSpec("sliding", 5), AttentionSpec("sliding", 4, num_sinks=2), AttentionSpec("sliding", 3, dilation=2),
           AttentionSpec("sliding", 5)]


@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1, 1], [3, 1, 6, 2, 1]], ids=["decode", "mixed"])
def test_mixed_options_in_one_batch_match_each_option_alone(device, q_lens):
    from flashserve.kernels.triton_backend import TritonAttentionBackend

    seq_lens = [37, 9, 50, 21, 12]
    batch = PagedBatch(seq_lens, q_lens, 4, 2, 16, 4, torch.float32, device, seed=7)
    meta = replace(batch.meta, seq_attention=tuple(OPTIONS), memo={})
    groups = option_batches(meta)
    assert [o for o, _, _ in groups] == [AttentionSpec(), OPTIONS[1], OPTIONS[2], OPTIONS[3]]  # full first, 5 shares 1
    assert sorted(torch.cat([t for _, _, t in groups]).tolist()) == list(range(sum(q_lens)))
    outs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend(num_splits=2)):
        kc, vc = batch.k_cache.clone(), batch.v_cache.clone()
        outs.append(backend.forward(batch.q, batch.k_new, batch.v_new, kc, vc, replace(meta, memo={}), 0.3))
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    for i, option in enumerate(OPTIONS):  # sequence i alone, with its option as the layer's spec
        one = replace(batch.meta, query_start_loc=torch.tensor([0, q_lens[i]], dtype=torch.int32, device=device),
                      seq_lens=batch.meta.seq_lens[i : i + 1], block_tables=batch.meta.block_tables[i : i + 1],
                      slot_mapping=batch.meta.slot_mapping[starts[i] : starts[i + 1]], max_query_len=q_lens[i],
                      max_seq_len=seq_lens[i], query_lens_cpu=[q_lens[i]], seq_lens_cpu=[seq_lens[i]],
                      is_decode=q_lens[i] == 1, memo={})
        kc, vc = batch.k_cache.clone(), batch.v_cache.clone()
        rows = slice(starts[i], starts[i + 1])
        ref = TorchAttentionBackend().forward(batch.q[rows], batch.k_new[rows], batch.v_new[rows], kc, vc, one, 0.3,
                                              option or AttentionSpec())
        for out in outs:
            torch.testing.assert_close(out[rows], ref, atol=2e-5, rtol=1e-4)
        if option is not None:  # the option matters: full attention gives other outputs
            kc, vc = batch.k_cache.clone(), batch.v_cache.clone()
            full = TorchAttentionBackend().forward(batch.q[rows], batch.k_new[rows], batch.v_new[rows], kc, vc,
                                                   replace(one, memo={}), 0.3)
            assert not torch.allclose(full, ref, atol=1e-3)
