"""The Worker's persistent batch: per-request state kept across steps, and one step's inputs.

A request's state arrives once (``NewRequest``) and is updated in place by each plan: each
request owns a row (slot) of a persistent host token table ``[slots, max_model_len]`` and of a
persistent block table (host copy, and a device copy the Worker updates by one index_copy_ of
the plan's new ids per step); sampled tokens are appended to its token row when they come back.
Its counts (tokens known, tokens including those in flight, blocks held, ...) live in per-slot
arrays. Building a step's inputs is vectorised numpy work over those tables and arrays: gathers
by (slot, position), the new block ids' columns included; the plan entries' fields are read by
C-level maps (no Python frame per request).

Overlap: when a step is planned before the previous one's tokens came back, a request's last
token is not on the host yet. Its input slot is filled on the device from the previous step's
sampled-token tensor (``StepInputs.prev_scatter``), so no host synchronisation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain, compress
from operator import attrgetter

import numpy as np

from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import DecodeBatch, NewRequest, ScheduledRequest

_new_block_ids, _request_id, _slot = attrgetter("new_block_ids"), attrgetter("request_id"), attrgetter("slot")
_start_pos, _num_new_tokens, _sample = attrgetter("start_pos"), attrgetter("num_new_tokens"), attrgetter("sample")
_params, _attention = attrgetter("params"), attrgetter("attention")

# Writes into a device block table [slots, max_blocks]: (flat index slot * max_blocks + column, int64;
# block id, int32), so the device side is one index_copy_ of the flattened table.
BlockUpdates = tuple[np.ndarray, np.ndarray]


class RequestState:
    """What the Worker keeps for one request. Its tokens live in the batch's token table, and its
    counts in the batch's per-slot arrays (so a step reads and advances them for every request
    at once); the properties read and write them."""

    __slots__ = ("request_id", "params", "slot", "num_prompt_tokens", "penalty_slot", "banned", "spec", "_batch")

    def __init__(self, new: NewRequest, slot: int, penalty_slot: int | None, eos_token_ids: tuple[int, ...],
                 batch: InputBatch) -> None:
        self.request_id = new.request_id
        self.params: SamplingParams = new.params
        self.slot = slot
        self.num_prompt_tokens = len(new.prompt_token_ids)
        self.penalty_slot = penalty_slot
        self.banned = tuple(sorted(set(eos_token_ids) | set(new.params.stop_token_ids)))
        self.spec = None  # a proposer's state for this request (flashserve.spec)
        self._batch = batch

    @property
    def num_known(self) -> int:
        """Token values on the host."""
        return int(self._batch.num_known[self.slot])

    @num_known.setter
    def num_known(self, value: int) -> None:
        self._batch.num_known[self.slot] = value

    @property
    def num_tokens(self) -> int:
        """Known tokens and those sampled by steps in flight."""
        return int(self._batch.num_tokens[self.slot])

    @num_tokens.setter
    def num_tokens(self, value: int) -> None:
        self._batch.num_tokens[self.slot] = value

    @property
    def num_blocks(self) -> int:
        """Columns of the request's block table the Worker holds."""
        return int(self._batch.num_blocks[self.slot])

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
    token_lora: np.ndarray | None = None  # [T] int64: each token's LoRA adapter (-1: none); None: no token has one
    sample_slots: np.ndarray | None = None  # [S] int64: the batch slot of each sampling sequence
    states: list | None = None  # [B] the RequestState of each sequence

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
    """Request states, the host token and block tables, per-slot counts, and step-input building."""

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
        # Per slot: token values on the host, tokens including those sampled by steps in flight,
        # prompt tokens, block-table columns held, min_tokens, whether it has a grammar, and
        # whether its rows are plain greedy, whether it has an attention option.
        self.num_known = np.zeros(0, dtype=np.int64)
        self.num_tokens = np.zeros(0, dtype=np.int64)
        self.num_prompt = np.zeros(0, dtype=np.int64)
        self.num_blocks = np.zeros(0, dtype=np.int64)
        self.min_tokens = np.zeros(0, dtype=np.int64)
        self.grammar = np.zeros(0, dtype=bool)
        self.plain = np.zeros(0, dtype=bool)  # the request's rows are plain greedy (SamplingParams.plain_greedy)
        self.attention = np.zeros(0, dtype=bool)  # the request has an attention option
        self.lora = np.zeros(0, dtype=np.int64)  # index of the request's LoRA adapter (-1: none)
        self.lora_index: dict[str, int] = {}  # the served adapters' indices by name (flashserve.lora)
        self.generation = np.zeros(0, dtype=np.int64)  # bumped when the slot's request leaves
        # Live requests with a grammar, with an attention option, whose rows are not plain greedy,
        # with an adapter: while a count is 0 a step skips reading that column for its slots.
        self.num_grammar = self.num_attention = self.num_not_plain = self.num_lora = 0
        self._free_slots: list[int] = []

    @property
    def num_slots(self) -> int:
        return self.block_table.shape[0]

    def _grow(self) -> None:
        old = self.num_slots
        grow = max(16, old)
        self.tokens = np.concatenate([self.tokens, np.zeros((grow, self.max_model_len), np.int32)])
        self.block_table = np.concatenate([self.block_table, np.zeros((grow, self.max_blocks), np.int32)])
        self.group_tables = [np.concatenate([t, np.zeros((grow, self.max_blocks), np.int32)])
                             for t in self.group_tables]
        for name in ("num_known", "num_tokens", "num_prompt", "num_blocks", "min_tokens", "grammar", "plain",
                     "attention", "lora", "generation"):
            column = getattr(self, name)
            setattr(self, name, np.concatenate([column, np.zeros(grow, column.dtype)]))
        self._free_slots.extend(range(old + grow - 1, old - 1, -1))

    def add(self, new: NewRequest, penalty_slot: int | None) -> RequestState:
        if not self._free_slots:
            self._grow()
        slot = self._free_slots.pop()
        state = RequestState(new, slot, penalty_slot, self.eos_token_ids, self)
        n = len(new.prompt_token_ids)
        known = n + len(new.output_token_ids)
        self.tokens[slot, :n] = new.prompt_token_ids
        self.tokens[slot, n:known] = new.output_token_ids
        self.num_known[slot] = self.num_tokens[slot] = known
        self.num_prompt[slot] = n
        self.num_blocks[slot] = 0
        self.min_tokens[slot] = new.params.min_tokens
        self.grammar[slot] = grammar = new.params.structured_output is not None
        self.plain[slot] = plain = new.params.plain_greedy
        self.attention[slot] = attention = new.params.attention is not None
        self.lora[slot] = -1 if new.params.lora is None else self.lora_index[new.params.lora]
        self.num_grammar += grammar
        self.num_lora += new.params.lora is not None
        self.num_not_plain += not plain
        self.num_attention += attention
        self.states[new.request_id] = state
        return state

    def remove(self, request_id: str) -> RequestState | None:
        state = self.states.pop(request_id, None)
        if state is not None:
            slot = state.slot
            self._free_slots.append(slot)
            self.generation[slot] += 1
            self.num_grammar -= bool(self.grammar[slot])
            self.num_not_plain -= not self.plain[slot]
            self.num_attention -= bool(self.attention[slot])
            self.num_lora -= bool(self.lora[slot] >= 0)
        return state

    def append_one(self, slots: np.ndarray, token_ids: np.ndarray) -> None:
        """Record one sampled token in each of the (distinct) ``slots`` (a plain step's rows) at once."""
        known = self.num_known[slots]
        self.tokens[slots, known] = token_ids
        self.num_known[slots] = known + 1

    def append_steps(self, slots: np.ndarray, token_ids: np.ndarray, lens: np.ndarray) -> None:
        """Record a multi-step batch's tokens: row i of ``token_ids`` [S, steps] holds slot i's
        tokens, of which the first ``lens[i]`` are its own."""
        known = self.num_known[slots]
        mine = np.arange(token_ids.shape[1]) < lens[:, None]
        rows = np.repeat(slots, lens)
        self.tokens[rows, (known[:, None] + np.arange(token_ids.shape[1]))[mine]] = token_ids[mine]
        self.num_known[slots] = known + lens

    def append(self, state: RequestState, token_ids: tuple[int, ...], counted: bool = False) -> None:
        """Record tokens a step sampled for the request (several when drafts were accepted, or in a
        multi-step batch, whose tokens were ``counted`` when it was launched)."""
        n, slot = len(token_ids), state.slot
        known = int(self.num_known[slot])
        self.tokens[slot, known : known + n] = token_ids
        self.num_known[slot] = known + n
        if not counted:
            self.num_tokens[slot] += n - 1  # build() counted one token for the step

    def all_plain(self, slots: np.ndarray) -> bool:
        """Whether the requests in ``slots`` are all plain greedy (the argmax alone samples them)."""
        return not self.num_not_plain or bool(self.plain[slots].all())

    def grammar_waits(self, slots: np.ndarray) -> bool:
        """True when a request in ``slots`` has a grammar and the token before its next sample is
        still in flight (its mask needs that token)."""
        if not self.num_grammar:
            return False
        g = slots[self.grammar[slots]]
        return bool(len(g)) and bool((self.num_known[g] < self.num_tokens[g] - 1).any())

    def append_blocks(self, entries: tuple[ScheduledRequest, ...]) -> tuple[BlockUpdates | None, tuple[BlockUpdates | None, ...]]:
        """Append the plan entries' new block ids to the host tables (group 0's and the other
        groups'); returns the updates of the device tables, None where none changes."""
        slots = np.fromiter(map(_slot, entries_states(self.states, entries)), np.int64, len(entries))
        return self._append_plan_ids(slots, None, entries)

    def _entry_ids(self, grown: list[ScheduledRequest], slots: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The new ids of entries that bring some (a request's entries bring as many ids in every
        group), with the slot of each id, grouped by request: (slots, ids of each group)."""
        counts = np.fromiter(map(len, map(_new_block_ids, grown)), np.int64, len(grown))
        ids = [np.fromiter(chain.from_iterable(map(_new_block_ids, grown)), np.int64, int(counts.sum()))]
        for g in range(len(self.group_tables)):
            # warm-up plans send no group ids: zeros stand in
            ids.append(np.fromiter(chain.from_iterable(e.group_block_ids[g] if e.group_block_ids else (0,) * len(e.new_block_ids)
                                                       for e in grown), np.int64, len(ids[0])))
        return np.repeat(slots, counts), ids

    def _append_ids(self, row: np.ndarray, ids: list[np.ndarray]) -> tuple[BlockUpdates | None, tuple[BlockUpdates | None, ...]]:
        """Append block ids to the host tables (``ids``: group 0's, then the other groups') of
        the slots in ``row``, one per id, each request's ids together and in table order; returns
        the device tables' updates. Array work."""
        # each new id's column: the row's blocks so far plus its place among the request's new ids
        next_request = row[1:] != row[:-1]
        if next_request.all():  # one id per request (decodes)
            col = self.num_blocks[row]
            self.num_blocks[row] = col + 1
        else:
            first = np.flatnonzero(np.concatenate(([True], next_request)))
            counts = np.diff(np.append(first, len(row)))
            have = self.num_blocks[row[first]]
            self.num_blocks[row[first]] = have + counts
            col = np.arange(len(row), dtype=np.int64) - np.repeat(first - have, counts)
        flat = row * self.max_blocks + col
        # a released block (-1, windowed) is never read: 0 stands in
        updates = []
        for table, blk in zip((self.block_table, *self.group_tables), ids):
            blk = np.maximum(blk, 0).astype(np.int32)
            table[row, col] = blk
            updates.append((flat, blk))
        return updates[0], tuple(updates[1:])

    def build(self, entries: tuple[ScheduledRequest, ...], prev_rows: np.ndarray,
              num_drafts: np.ndarray | None = None, decodes: DecodeBatch | None = None) -> StepInputs:
        """Inputs of one step: its ``decodes`` (claimed at once, first in the batch), then its
        ``entries``. ``prev_rows``: per slot, the row of the step in flight's sampled tokens (-1:
        none), for requests whose last token has not come back to the host. ``num_drafts``: per
        sequence, draft tokens a proposer wrote into the token table after the known ones.
        Per-entry fields are gathered by C-level maps, everything else is array work."""
        bs = self.block_size
        k = len(decodes) if decodes is not None else 0
        count = k + len(entries)
        states = entries_states(self.states, entries)
        if k:
            states = list(map(self.states.__getitem__, decodes.request_ids)) + states
        slots = np.fromiter(map(_slot, states), np.int64, count)
        # Block ids the plan appends: host table now, device table through ``block_updates``.
        block_updates, group_block_updates = self._append_plan_ids(slots, decodes, entries)
        if entries or not k:
            starts = np.fromiter(map(_start_pos, entries), np.int64, len(entries))
            lens = np.fromiter(map(_num_new_tokens, entries), np.int64, len(entries))
            sample = np.fromiter(map(_sample, entries), bool, len(entries))
            if k:
                starts = np.concatenate((decodes.start_pos, starts))
                lens = np.concatenate((np.ones(k, np.int64), lens))
                sample = np.concatenate((np.ones(k, bool), sample))
        else:  # only decodes: one token each, each sampled
            starts, lens, sample = decodes.start_pos, np.ones(k, np.int64), np.ones(k, bool)
        known = self.num_known[slots]
        if num_drafts is not None:
            known = known + num_drafts
        qsl = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(lens, out=qsl[1:])
        total = int(qsl[-1])
        if total == count and not (lens - 1).any():  # one token per sequence (decodes): token i is sequence i's
            positions, token_slots, token_known = starts, slots, known
        else:
            seq_ids = np.repeat(np.arange(count), lens)  # [T] sequence of each token
            positions = np.arange(total, dtype=np.int64) - qsl[seq_ids] + starts[seq_ids]
            token_slots, token_known = slots[seq_ids], known[seq_ids]
        cols, offsets = np.divmod(positions, bs)
        slot_mapping = self.block_table[token_slots, cols].astype(np.int64) * bs + offsets
        group_slots = tuple(t[token_slots, cols].astype(np.int64) * bs + offsets for t in self.group_tables)
        input_ids = self.tokens[token_slots, np.minimum(positions, self.max_model_len - 1)].astype(np.int64)
        # A token past the known ones was sampled by the step in flight (its last model step's):
        # it comes from the device.
        pending = np.flatnonzero(positions >= token_known)
        prev_scatter = None
        if len(pending):
            input_ids[pending] = 0
            rows = prev_rows[token_slots[pending]]
            assert (rows >= 0).all(), "a pending token's row in the step in flight is unknown"
            newest = self.num_tokens[token_slots[pending]] - 1  # the newest token, counting those in flight
            assert (positions[pending] == newest).all(), "only the newest token may be in flight"
            prev_scatter = (pending, rows)
        sample_rows = np.flatnonzero(sample)
        sample_slots = slots[sample_rows]
        self.num_tokens[sample_slots] += 1
        return StepInputs(
            seq_attention=tuple(map(_attention, map(_params, states))) if self.num_attention and self.attention[slots].any() else None,
            token_lora=self.lora[token_slots] if self.num_lora else None,
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=qsl.astype(np.int32),
            seq_lens=(starts + lens).astype(np.int32),
            slots=slots,
            logits_indices=qsl[1:][sample_rows] - 1,
            sample_rows=sample_rows.tolist(),
            sample_slots=sample_slots,
            prev_scatter=prev_scatter,
            block_updates=block_updates,
            group_slot_mapping=group_slots,
            group_block_updates=group_block_updates,
            states=states,
        )

    def later_steps(self, first: StepInputs, lens: np.ndarray, num_steps: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Model steps 1 .. num_steps - 1 of a multi-step decode batch whose step 0 is ``first``:
        each row decodes the position after its previous one. A row whose ``lens`` tokens are
        done repeats its last position and stores nothing (slot -1); its tokens are not read.
        Per step and row: positions [S-1, B] int64, cache slots in each group's table
        [S-1, groups, B] int64, context lengths [S-1, B] int32."""
        bs = self.block_size
        j = np.arange(1, num_steps, dtype=np.int64)[:, None]
        done = j >= lens
        positions = first.positions + np.where(done, lens - 1, j)
        cols, offsets = np.divmod(positions, bs)
        cache = np.stack([np.where(done, -1, table[first.slots, cols].astype(np.int64) * bs + offsets)
                          for table in (self.block_table, *self.group_tables)], axis=1)
        return positions, cache, (positions + 1).astype(np.int32)

    def step_inputs(self, first: StepInputs, positions: np.ndarray, cache: np.ndarray, seq_lens: np.ndarray) -> StepInputs:
        """``first`` moved on to one of its ``later_steps``: every row's input token is the one
        the step before sampled, on the device (``prev_scatter``, every row)."""
        rows = np.arange(first.num_seqs, dtype=np.int64)
        return replace(first, input_ids=np.zeros(len(rows), np.int64), positions=positions, slot_mapping=cache[0],
                       group_slot_mapping=tuple(cache[1:]), seq_lens=seq_lens, prev_scatter=(rows, rows),
                       block_updates=None, group_block_updates=tuple(None for _ in self.group_tables))

    def _append_plan_ids(self, slots: np.ndarray, decodes: DecodeBatch | None, entries: tuple[ScheduledRequest, ...]
                         ) -> tuple[BlockUpdates | None, tuple[BlockUpdates | None, ...]]:
        """``append_blocks`` for a step's decodes and entries (``slots``: of the step's sequences)."""
        k = len(decodes) if decodes is not None else 0
        parts = []
        if k and len(decodes.block_rows):
            assert len(decodes.group_block_ids) == len(self.group_tables), "decodes bring every group's new ids"
            parts.append((slots[decodes.block_rows], [decodes.block_ids, *decodes.group_block_ids]))
        grown = list(compress(range(len(entries)), map(_new_block_ids, entries)))
        if grown:
            parts.append(self._entry_ids(list(map(entries.__getitem__, grown)), slots[k + np.array(grown, np.int64)]))
        if not parts:
            return None, tuple(None for _ in self.group_tables)
        if len(parts) == 1:
            return self._append_ids(*parts[0])
        return self._append_ids(np.concatenate([p[0] for p in parts]),
                                [np.concatenate(ids) for ids in zip(*(p[1] for p in parts))])


def entries_states(states: dict[str, RequestState], entries: tuple[ScheduledRequest, ...]) -> list[RequestState]:
    """The request state of each entry (a C-level map: no Python frame per entry)."""
    return list(map(states.__getitem__, map(_request_id, entries)))
