"""The Worker's persistent batch: per-request state kept across steps, and one step's inputs.

A request's state arrives once (``NewRequest``) and is updated in place by each plan: each
request owns a row (slot) of a persistent host token table ``[slots, max_model_len]`` and of a
persistent block table (host copy, and a device copy the Worker updates by a small scatter per
step); sampled tokens are appended to its token row when they come back. Building a step's
inputs is vectorised numpy work over those tables: gathers by (slot, position), no Python loop
over tokens and only a light one over the scheduled requests.

Overlap: when a step is planned before the previous one's tokens came back, a request's last
token is not on the host yet. Its input slot is filled on the device from the previous step's
sampled-token tensor (``StepInputs.prev_scatter``), so no host synchronisation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from operator import attrgetter

import numpy as np

from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import NewRequest, ScheduledRequest

_new_block_ids, _slot, _num_known = attrgetter("new_block_ids"), attrgetter("slot"), attrgetter("num_known")

BlockUpdates = tuple[np.ndarray, np.ndarray, np.ndarray]  # (slot, column, block id) writes into a device block table


class RequestState:
    """What the Worker keeps for one request (its tokens live in the batch's token table)."""

    __slots__ = ("request_id", "params", "slot", "num_known", "num_tokens", "num_prompt_tokens",
                 "num_blocks", "penalty_slot", "banned", "spec")

    def __init__(self, new: NewRequest, slot: int, penalty_slot: int | None, eos_token_ids: tuple[int, ...]) -> None:
        self.request_id = new.request_id
        self.params: SamplingParams = new.params
        self.slot = slot
        self.num_known = len(new.prompt_token_ids) + len(new.output_token_ids)  # token values on the host
        self.num_tokens = self.num_known  # known + sampled by steps in flight
        self.num_prompt_tokens = len(new.prompt_token_ids)
        self.num_blocks = 0
        self.penalty_slot = penalty_slot
        self.banned = tuple(sorted(set(eos_token_ids) | set(new.params.stop_token_ids)))
        self.spec = None  # a proposer's state for this request (flashserve.spec)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


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
    block_updates: BlockUpdates | None
    # groups 1, 2, ... of layers (flashserve.cache.kv_groups): their slot mappings and table updates
    group_slot_mapping: tuple[np.ndarray, ...] = ()
    group_block_updates: tuple[BlockUpdates | None, ...] = ()
    # per sequence, its request's attention option (flashserve.layers.request_attention); None: none asks
    seq_attention: tuple | None = None

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
    """Request states, the host token and block tables, and step-input building."""

    def __init__(self, max_model_len: int, block_size: int, eos_token_ids: tuple[int, ...], num_groups: int = 1) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.eos_token_ids = eos_token_ids
        self.states: dict[str, RequestState] = {}
        self.tokens = np.zeros((0, max_model_len), dtype=np.int32)  # [slots, max_model_len]
        self.block_table = np.zeros((0, self.max_blocks), dtype=np.int32)  # [slots, max_blocks]
        # the tables of layer groups 1, 2, ... (the request's block count is the same in every group)
        self.group_tables = [np.zeros((0, self.max_blocks), dtype=np.int32) for _ in range(num_groups - 1)]
        self._free_slots: list[int] = []

    @property
    def num_slots(self) -> int:
        return self.block_table.shape[0]

    def add(self, new: NewRequest, penalty_slot: int | None) -> RequestState:
        if not self._free_slots:
            old = self.num_slots
            grow = max(16, old)
            self.tokens = np.concatenate([self.tokens, np.zeros((grow, self.max_model_len), np.int32)])
            self.block_table = np.concatenate([self.block_table, np.zeros((grow, self.max_blocks), np.int32)])
            self.group_tables = [np.concatenate([t, np.zeros((grow, self.max_blocks), np.int32)])
                                 for t in self.group_tables]
            self._free_slots.extend(range(old + grow - 1, old - 1, -1))
        state = RequestState(new, self._free_slots.pop(), penalty_slot, self.eos_token_ids)
        n = len(new.prompt_token_ids)
        self.tokens[state.slot, :n] = new.prompt_token_ids
        self.tokens[state.slot, n : state.num_known] = new.output_token_ids
        self.states[new.request_id] = state
        return state

    def remove(self, request_id: str) -> RequestState | None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self._free_slots.append(state.slot)
        return state

    def append_one(self, states: list[RequestState], token_ids: list[int]) -> None:
        """Record one sampled token for each of ``states`` (a plain step's rows) in one table write."""
        self.tokens[list(map(_slot, states)), list(map(_num_known, states))] = token_ids
        for state in states:
            state.num_known += 1

    def append(self, state: RequestState, token_ids: tuple[int, ...]) -> None:
        """Record tokens a step sampled for the request (several when drafts were accepted)."""
        n = len(token_ids)
        self.tokens[state.slot, state.num_known : state.num_known + n] = token_ids
        state.num_known += n
        state.num_tokens += n - 1  # build() counted one token for the step

    def append_blocks(self, entries: tuple[ScheduledRequest, ...]) -> tuple[BlockUpdates | None, tuple[BlockUpdates | None, ...]]:
        """Append the plan's new block ids to the host tables (group 0's and the other groups');
        returns the (slot, column, block id) updates of the device tables, None where none changes."""
        upd_slot, upd_col, upd_blk = [], [], []
        group_upd: list[list[int]] = [[] for _ in self.group_tables]
        for e in compress(entries, map(_new_block_ids, entries)):  # the few entries with new blocks
            st = self.states[e.request_id]
            n = len(e.new_block_ids)
            upd_slot += [st.slot] * n
            upd_col += range(st.num_blocks, st.num_blocks + n)
            upd_blk += e.new_block_ids
            group_ids = e.group_block_ids or tuple((0,) * n for _ in self.group_tables)  # (warm-up plans)
            for new_ids, upd in zip(group_ids, group_upd):
                upd += new_ids
            st.num_blocks += n
        if not upd_slot:
            return None, tuple(None for _ in self.group_tables)
        # one write per table; a released block (-1, windowed) is never read: 0 stands in
        slot, col = np.array(upd_slot, np.int64), np.array(upd_col, np.int64)
        updates = []
        for table, ids in zip((self.block_table, *self.group_tables), (upd_blk, *group_upd)):
            blk = np.maximum(np.array(ids, np.int64), 0)
            table[slot, col] = blk
            updates.append((slot, col, blk))
        return updates[0], tuple(updates[1:])

    def build(self, entries: tuple[ScheduledRequest, ...], prev_rows: dict[str, int],
              num_drafts: np.ndarray | None = None) -> StepInputs:
        """Inputs of one step. ``prev_rows``: request id -> row of the step in flight's sampled
        tokens, for requests whose last token has not come back to the host. ``num_drafts``: per
        entry, draft tokens a proposer wrote into the token table after the known ones."""
        bs = self.block_size
        states = [self.states[e.request_id] for e in entries]
        # Block ids the plan appends: host table now, device table through ``block_updates``.
        block_updates, group_block_updates = self.append_blocks(entries)
        count = len(entries)
        starts = np.fromiter((e.start_pos for e in entries), np.int64, count)
        lens = np.fromiter((e.num_new_tokens for e in entries), np.int64, count)
        slots = np.fromiter((st.slot for st in states), np.int64, count)
        known = np.fromiter((st.num_known for st in states), np.int64, count)
        if num_drafts is not None:
            known = known + num_drafts
        qsl = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(lens, out=qsl[1:])
        total = int(qsl[-1])
        seq_ids = np.repeat(np.arange(count), lens)  # [T] sequence of each token
        positions = np.arange(total, dtype=np.int64) - qsl[seq_ids] + starts[seq_ids]
        token_slots = slots[seq_ids]
        slot_mapping = self.block_table[token_slots, positions // bs].astype(np.int64) * bs + positions % bs
        group_slots = tuple(t[token_slots, positions // bs].astype(np.int64) * bs + positions % bs
                            for t in self.group_tables)
        input_ids = self.tokens[token_slots, np.minimum(positions, self.max_model_len - 1)].astype(np.int64)
        # A token past the known ones was sampled by the step in flight: it comes from the device.
        pending = np.flatnonzero(positions >= known[seq_ids])
        prev_scatter = None
        if len(pending):
            input_ids[pending] = 0
            pending_seqs = seq_ids[pending]
            rows = [prev_rows[states[i].request_id] for i in pending_seqs.tolist()]
            assert (positions[pending] == known[pending_seqs]).all(), "only the newest token may be in flight"
            prev_scatter = (pending.astype(np.int64), np.array(rows, np.int64))
        sample_rows = [i for i, e in enumerate(entries) if e.sample]
        for i in sample_rows:
            states[i].num_tokens += 1
        seq_attention = tuple(st.params.attention for st in states)
        return StepInputs(
            seq_attention=seq_attention if any(a is not None for a in seq_attention) else None,
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=qsl.astype(np.int32),
            seq_lens=(starts + lens).astype(np.int32),
            slots=slots,
            logits_indices=qsl[1:][sample_rows] - 1,
            sample_rows=sample_rows,
            prev_scatter=prev_scatter,
            block_updates=block_updates,
            group_slot_mapping=group_slots,
            group_block_updates=group_block_updates,
        )
