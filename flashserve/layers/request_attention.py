"""Per-request attention options: a request may narrow the layers the engine runs with full
attention to a sliding window (with dilation) or to a window plus sink tokens.

``SamplingParams(attention={"kind": "window", "window": 1024})`` (the OpenAI body extension
``"attention": {...}``) is parsed by ``parse_request_attention`` into an ``AttentionSpec``:

    {"kind": "full"}
    {"kind": "window", "window": W, "dilation": D}        # D defaults to 1
    {"kind": "sinks", "window": W, "sinks": N}            # StreamingLLM: N >= 1 sinks + a window

The Worker hands each step's per-sequence specs to the layers through the attention metadata
(``AttentionMetadata.seq_attention``); ``layer_spec_for`` picks a sequence's spec in a layer:
the request's where the layer is full attention, the layer's own otherwise (Gemma 3's local
layers keep their window, an engine-wide H2O stays H2O). Requests with different options run in
one step: the torch backend attends sequence by sequence, the Triton backend launches its kernels
once per distinct option over that option's sequences (such steps run eagerly, not in a CUDA graph).

The per-request kinds are the stateless ones: H2O (which compacts the KV it keeps), Quest (which
keeps page bounds from the first token) and LSH change what is stored or need engine-wide state,
so they are per-engine options only and are refused here with a clear error. A per-request window
reads fewer keys but frees no KV memory (the block manager is per engine), and its K/V differ
from a full-attention run's, so its prefix-cache hashes are salted with the option
(``prefix_salt``): it shares blocks only with requests of the same option.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flashserve.config import AttentionSpec

REQUEST_KINDS = ("full", "window", "sinks")
_FIELDS = {"full": (), "window": ("window", "dilation"), "sinks": ("window", "sinks")}
_ENGINE_ONLY = ("h2o", "quest", "lsh", "sliding")


def parse_request_attention(value: Any) -> AttentionSpec | None:
    """A request's ``attention`` option (None, a dict as above, or an AttentionSpec of kind full
    or sliding) as an AttentionSpec; ValueError naming the problem and the limit."""
    if value is None or isinstance(value, AttentionSpec):
        if isinstance(value, AttentionSpec) and value.kind not in ("full", "sliding"):
            raise ValueError(f"attention kind {value.kind!r} is a per-engine option; a request may ask for "
                             f"{', '.join(REQUEST_KINDS)}")
        return value
    if not isinstance(value, dict):
        raise ValueError(f"attention must be an object like {{\"kind\": \"window\", \"window\": 1024}}, got {value!r}")
    kind = value.get("kind")
    if kind in _ENGINE_ONLY and kind != "sliding":
        raise ValueError(f"attention kind {kind!r} keeps engine-wide KV state and is a per-engine option "
                         f"(--attention {kind}); a request may ask for {', '.join(REQUEST_KINDS)}")
    if kind not in _FIELDS:
        raise ValueError(f"unknown request attention kind {kind!r}; expected one of {', '.join(REQUEST_KINDS)}")
    unknown = sorted(set(value) - {"kind", *_FIELDS[kind]})
    if unknown:
        raise ValueError(f"attention kind {kind!r} takes {', '.join(_FIELDS[kind]) or 'no other fields'}; "
                         f"unknown: {', '.join(unknown)}")
    if kind == "full":
        return AttentionSpec()
    ints = {}
    for name in _FIELDS[kind]:
        v = value.get(name, 1 if name == "dilation" else None)
        if v is None:
            raise ValueError(f"attention kind {kind!r} needs {name!r}")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"attention {name} must be an integer, got {v!r}")
        ints[name] = v
    if ints["window"] < 1:
        raise ValueError(f"attention window must be >= 1 token, got {ints['window']}")
    if kind == "sinks" and ints["sinks"] < 1:
        raise ValueError(f"attention kind 'sinks' needs sinks >= 1, got {ints['sinks']}")
    return AttentionSpec("sliding", ints["window"], dilation=ints.get("dilation", 1), num_sinks=ints.get("sinks", 0))


def layer_spec_for(layer: AttentionSpec, request: AttentionSpec | None) -> AttentionSpec:
    """The spec a sequence uses in a layer: the request's where the layer attends fully."""
    if request is None or layer.kind != "full":
        return layer
    return replace(request, rope_theta=layer.rope_theta)


def prefix_salt(request: AttentionSpec | None) -> list[int] | None:
    """Tokens that start a request's prefix-cache hash chain (None: the plain chain), so that
    K/V computed under different attention options are never shared."""
    if request is None or request.kind == "full":
        return None
    return [-1000, request.sliding_window or 0, request.dilation, request.num_sinks]


def option_batches(meta):  # AttentionMetadata -> list[(AttentionSpec, AttentionMetadata, tokens [n] int64)]
    """A step's sequences grouped by attention option, each group as its own metadata (its
    sequences' tables, lengths and slots) plus the indices of its tokens in the step; derived from
    host lists once per step (no device sync) and shared by every layer. Full attention first."""
    if "option_batches" in meta.memo:
        return meta.memo["option_batches"]
    import torch

    from flashserve.layers.attention_metadata import AttentionMetadata

    full = AttentionSpec()
    by_option: dict[AttentionSpec, list[int]] = {full: []}
    for i, option in enumerate(meta.seq_attention):
        by_option.setdefault(option if option is not None else full, []).append(i)
    starts = [0]
    for n in meta.query_lens_cpu:
        starts.append(starts[-1] + n)
    device = meta.seq_lens.device
    batches = []
    for option, seqs in by_option.items():
        if not seqs:
            continue
        query_lens = [meta.query_lens_cpu[i] for i in seqs]
        seq_lens = [meta.seq_lens_cpu[i] for i in seqs]
        tokens = torch.tensor([t for i in seqs for t in range(starts[i], starts[i + 1])], dtype=torch.int64, device=device)
        index = torch.tensor(seqs, dtype=torch.int64, device=device)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        sub = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=meta.seq_lens.index_select(0, index), block_tables=meta.block_tables.index_select(0, index),
            slot_mapping=meta.slot_mapping.index_select(0, tokens), max_query_len=max(query_lens),
            max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=meta.block_size,
            is_decode=all(n == 1 for n in query_lens))
        batches.append((option, sub, tokens))
    meta.memo["option_batches"] = batches
    return batches
