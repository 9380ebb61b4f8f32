"""The Worker's persistent batch (``flashserve.runner.input_batch``): per-slot counts behind the
request states, step inputs from them, and a reused slot starting afresh."""

import numpy as np
import pytest

from flashserve.runner.input_batch import InputBatch
from flashserve.sampling_params import SamplingParams, StructuredOutput
from flashserve.sched.plan import NewRequest, ScheduledRequest

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def new(rid, prompt, outputs=(), params=GREEDY):
    return NewRequest(rid, tuple(prompt), tuple(outputs), params)


def test_states_read_and_write_the_slot_arrays():
    batch = InputBatch(max_model_len=32, block_size=4, eos_token_ids=(0,))
    a = batch.add(new("a", [5, 6, 7, 8, 9]), None)
    b = batch.add(new("b", [3, 4, 5], outputs=[11, 12]), None)
    assert (a.num_known, a.num_tokens, a.num_blocks, b.num_known, b.num_tokens) == (5, 5, 0, 5, 5)
    inp = batch.build((ScheduledRequest("a", 0, 5, (1, 2), True), ScheduledRequest("b", 0, 5, (3, 4), True)),
                      np.full(batch.num_slots, -1))
    assert inp.input_ids.tolist() == [5, 6, 7, 8, 9, 3, 4, 5, 11, 12]
    assert inp.slot_mapping.tolist() == [4, 5, 6, 7, 8, 12, 13, 14, 15, 16]
    assert inp.sample_rows == [0, 1] and inp.sample_slots.tolist() == [a.slot, b.slot]
    assert (a.num_tokens, a.num_known, a.num_blocks, b.num_blocks) == (6, 5, 2, 2)
    batch.append_one(np.array([b.slot, a.slot]), np.array([21, 20]))
    assert (a.num_known, b.num_known) == (6, 6) and batch.tokens[a.slot, 5] == 20 and batch.tokens[b.slot, 5] == 21
    # a reused slot starts from the new request's counts, not the old one's
    slot = a.slot
    batch.remove("a")
    c = batch.add(new("c", [1, 2]), None)
    assert c.slot == slot and (c.num_known, c.num_tokens, c.num_blocks) == (2, 2, 0)


def test_a_token_in_flight_comes_from_its_row_of_the_previous_step():
    batch = InputBatch(max_model_len=32, block_size=4, eos_token_ids=(0,))
    a = batch.add(new("a", [5, 6, 7]), None)
    b = batch.add(new("b", [8, 9]), None)
    batch.build((ScheduledRequest("a", 0, 3, (1,), True), ScheduledRequest("b", 0, 2, (2,), True)),
                np.full(batch.num_slots, -1))
    prev = np.full(batch.num_slots, -1)
    prev[a.slot], prev[b.slot] = 1, 0  # the step in flight sampled b in row 0, a in row 1
    inp = batch.build((ScheduledRequest("b", 2, 1, (), True), ScheduledRequest("a", 3, 1, (), True)), prev)
    assert inp.positions.tolist() == [2, 3] and inp.input_ids.tolist() == [0, 0]
    assert [r.tolist() for r in inp.prev_scatter] == [[0, 1], [0, 1]]
    prev[b.slot] = -1  # no row of the step in flight holds b's token
    with pytest.raises(AssertionError, match="row in the step in flight"):
        batch.build((ScheduledRequest("b", 2, 1, (), True),), prev)


def test_grammar_waits_only_for_a_grammar_row_whose_previous_token_is_in_flight():
    batch = InputBatch(max_model_len=32, block_size=4, eos_token_ids=(0,))
    grammar = SamplingParams(temperature=0, max_tokens=8, structured_output=StructuredOutput("regex", "[0-9]+"))
    a = batch.add(new("a", [5, 6]), None)
    g = batch.add(new("g", [7, 8], params=grammar), None)
    slots = np.array([a.slot, g.slot])
    assert not batch.grammar_waits(slots)
    batch.build((ScheduledRequest("a", 0, 2, (1,), True), ScheduledRequest("g", 0, 2, (2,), True)),
                np.full(batch.num_slots, -1))
    assert not batch.grammar_waits(slots)  # its one token in flight is the one it will sample after
    prev = np.full(batch.num_slots, -1)
    prev[slots] = [0, 1]
    batch.build((ScheduledRequest("a", 2, 1, (), True), ScheduledRequest("g", 2, 1, (), True)), prev)
    assert batch.grammar_waits(slots) and not batch.grammar_waits(slots[:1])
    batch.append_one(slots, np.array([1, 2]))
    assert not batch.grammar_waits(slots)


def test_a_slot_generation_moves_on_when_its_request_leaves():
    batch = InputBatch(max_model_len=32, block_size=4, eos_token_ids=(0,))
    a = batch.add(new("a", [5, 6]), None)
    before = int(batch.generation[a.slot])
    batch.remove("a")
    c = batch.add(new("c", [7]), None)
    assert c.slot == a.slot and int(batch.generation[c.slot]) != before


def test_flag_counts_follow_the_live_requests_and_blocks_append_by_column():
    """The counts that let a step skip the grammar / plain / attention flags track adds and
    removes (a reused slot's old flags do not count), and new block ids land after each
    request's columns, in the host table and in the flat device updates."""
    batch = InputBatch(max_model_len=64, block_size=4, eos_token_ids=(0,))
    grammar = SamplingParams(temperature=0, max_tokens=8, structured_output=StructuredOutput("regex", "a+"))
    sampled = SamplingParams(temperature=0.7, max_tokens=8)
    a = batch.add(new("a", [1, 2, 3]), None)
    batch.add(new("g", [1, 2], params=grammar), None)
    batch.add(new("s", [4], params=sampled), None)
    assert (batch.num_grammar, batch.num_not_plain, batch.num_attention) == (1, 2, 0)
    batch.remove("g")
    batch.remove("s")
    assert (batch.num_grammar, batch.num_not_plain) == (0, 0)
    b = batch.add(new("b", [7, 8, 9, 10, 11]), None)  # takes a freed slot whose flags were set
    assert (batch.num_grammar, batch.num_not_plain) == (0, 0) and not batch.grammar_waits(np.array([b.slot]))
    main, groups = batch.append_blocks((ScheduledRequest("a", 0, 3, (5,), True),
                                        ScheduledRequest("b", 0, 5, (6, 7), True)))
    main2, _ = batch.append_blocks((ScheduledRequest("b", 5, 4, (9,), True), ScheduledRequest("a", 3, 2, (8,), True)))
    assert batch.block_table[a.slot, :2].tolist() == [5, 8] and batch.block_table[b.slot, :3].tolist() == [6, 7, 9]
    width = batch.max_blocks
    assert main[0].tolist() == [a.slot * width, b.slot * width, b.slot * width + 1] and main[1].tolist() == [5, 6, 7]
    assert main2[0].tolist() == [b.slot * width + 2, a.slot * width + 1] and main2[1].tolist() == [9, 8]
    assert groups == () and (a.num_blocks, b.num_blocks) == (2, 3)
