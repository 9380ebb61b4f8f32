"""The Worker's persistent batch: per-request state kept across steps, and one step's inputs.

A request's state arrives once (``NewRequest``) and is updated in place by each plan: block ids
are appended to its row of a persistent block table (host copy and device copy, the device copy
updated by a small scatter per step), sampled tokens are appended when they come back. Building a
step's inputs is numpy work over the scheduled requests only (no per-token Python loops), and
produces one host buffer that is copied to the device in a single transfer.

Overlap: when a step is planned before the previous one's tokens came back, a request's last
token is not on the host yet. Its input slot is filled on the device from the previous step's
sampled-token tensor (``StepInputs.prev_scatter``), so no host synchronisation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import NewRequest, ScheduledRequest


class RequestState:
    """What the Worker keeps for one request."""

    __slots__ = ("request_id", "params", "slot", "tokens", "num_known", "num_tokens", "num_prompt_tokens",
                 "num_blocks", "penalty_slot", "banned")

    def __init__(self, new: NewRequest, slot: int, penalty_slot: int | None, eos_token_ids: tuple[int, ...]) -> None:
        known = new.prompt_token_ids + new.output_token_ids
        self.request_id = new.request_id
        self.params: SamplingParams = new.params
        self.slot = slot
        self.tokens = np.zeros(max(16, 2 * len(known)), dtype=np.int64)
        self.tokens[: len(known)] = known
        self.num_known = len(known)  # tokens whose values are on the host
        self.num_tokens = len(known)  # known + sampled by steps in flight
        self.num_prompt_tokens = len(new.prompt_token_ids)
        self.num_blocks = 0
        self.penalty_slot = penalty_slot
        self.banned = tuple(sorted(set(eos_token_ids) | set(new.params.stop_token_ids)))

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def append(self, token_ids: tuple[int, ...]) -> None:
        n = len(token_ids)
        if self.num_known + n > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.zeros(len(self.tokens) + n, dtype=np.int64)])
        self.tokens[self.num_known : self.num_known + n] = token_ids
        self.num_known += n


@dataclass
class StepInputs:
    """One step's model inputs as host arrays (B sequences, T new tokens, S sampling rows)."""

    input_ids: np.ndarray  # [T] int64 (in-flight tokens are 0 here, filled on the device)
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    slots: np.ndarray  # [B] int64: each sequence's row in the persistent block table
    logits_indices: np.ndarray  # [S] int64: last new token of each sampling sequence
    sample_rows: list[int]  # [S] plan index of each sampling sequence
    prev_scatter: tuple[np.ndarray, np.ndarray] | None  # (input index, row of the previous step's tokens)
    block_updates: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (slot, column, block id)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs


class InputBatch:
    """Request states, the host block table, and step-input building."""

    def __init__(self, max_blocks_per_seq: int, block_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.eos_token_ids = eos_token_ids
        self.states: dict[str, RequestState] = {}
        self.block_table = np.zeros((0, max_blocks_per_seq), dtype=np.int32)  # [slots, max_blocks]
        self._free_slots: list[int] = []

    @property
    def num_slots(self) -> int:
        return self.block_table.shape[0]

    def add(self, new: NewRequest, penalty_slot: int | None) -> RequestState:
        if not self._free_slots:
            old = self.num_slots
            grow = max(16, old)
            self.block_table = np.concatenate([self.block_table, np.zeros((grow, self.max_blocks), np.int32)])
            self._free_slots.extend(range(old + grow - 1, old - 1, -1))
        state = RequestState(new, self._free_slots.pop(), penalty_slot, self.eos_token_ids)
        self.states[new.request_id] = state
        return state

    def remove(self, request_id: str) -> RequestState | None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self._free_slots.append(state.slot)
        return state

    def build(self, entries: tuple[ScheduledRequest, ...], prev_rows: dict[str, int]) -> StepInputs:
        """Inputs of one step. ``prev_rows``: request id -> row of the step in flight's sampled
        tokens, for requests whose last token has not come back to the host."""
        bs = self.block_size
        states = [self.states[e.request_id] for e in entries]
        # Block ids the plan appends: host table now, device table through ``block_updates``.
        upd_slot, upd_col, upd_blk = [], [], []
        for e, st in zip(entries, states):
            if e.new_block_ids:
                n = len(e.new_block_ids)
                cols = range(st.num_blocks, st.num_blocks + n)
                self.block_table[st.slot, st.num_blocks : st.num_blocks + n] = e.new_block_ids
                upd_slot += [st.slot] * n
                upd_col += cols
                upd_blk += e.new_block_ids
                st.num_blocks += n
        starts = np.fromiter((e.start_pos for e in entries), np.int64, len(entries))
        counts = np.fromiter((e.num_new_tokens for e in entries), np.int64, len(entries))
        qsl = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        total = int(qsl[-1])
        seq_ids = np.repeat(np.arange(len(entries)), counts)  # [T] sequence of each token
        positions = np.arange(total, dtype=np.int64) - qsl[seq_ids] + starts[seq_ids]
        slots = np.fromiter((st.slot for st in states), np.int64, len(states))
        blocks = self.block_table[slots[seq_ids], positions // bs]
        slot_mapping = blocks.astype(np.int64) * bs + positions % bs
        input_ids = np.zeros(total, dtype=np.int64)
        scatter_idx, scatter_row = [], []
        sample_rows = []
        for i, (e, st) in enumerate(zip(entries, states)):
            lo, hi = e.start_pos, e.start_pos + e.num_new_tokens
            known_hi = min(hi, st.num_known)
            if known_hi > lo:
                input_ids[qsl[i] : qsl[i] + known_hi - lo] = st.tokens[lo:known_hi]
            if hi > st.num_known:  # the last token was sampled by the step in flight
                assert hi == st.num_known + 1 and st.num_tokens == hi, "only the newest token may be in flight"
                scatter_idx.append(int(qsl[i + 1]) - 1)
                scatter_row.append(prev_rows[e.request_id])
            if e.sample:
                sample_rows.append(i)
                st.num_tokens += 1
        logits_indices = qsl[1:][sample_rows] - 1
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=qsl.astype(np.int32),
            seq_lens=(starts + counts).astype(np.int32),
            slots=slots,
            logits_indices=logits_indices,
            sample_rows=sample_rows,
            prev_scatter=(np.array(scatter_idx, np.int64), np.array(scatter_row, np.int64)) if scatter_idx else None,
            block_updates=(np.array(upd_slot, np.int64), np.array(upd_col, np.int64), np.array(upd_blk, np.int64))
            if upd_slot else None,
        )
