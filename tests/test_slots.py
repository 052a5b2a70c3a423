"""The scheduler's slot decisions (engines/slots.py) driven with plain token lists: no model."""

from __future__ import annotations

import pytest

from edge_llm.engines import slots
from edge_llm.engines.slots import Slot


def slot(seq_id: int, cached: list[int], last_used: float) -> Slot:
    return Slot(seq_id, cached=list(cached), last_used=last_used)


def test_common_prefix():
    assert slots.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert slots.common_prefix([1, 2], [1, 2, 3]) == 2
    assert slots.common_prefix([], [1]) == 0
    assert slots.common_prefix([5], [6]) == 0


def test_a_prompt_goes_to_the_slot_that_holds_most_of_it():
    idle = [slot(0, [1, 2, 9], 1.0), slot(1, [1, 2, 3, 4], 5.0), slot(2, [], 0.0)]
    chosen, reuse = slots.pick_slot([1, 2, 3, 4, 5, 6], idle)
    assert (chosen.seq_id, reuse) == (1, 4)


def test_equal_prefixes_go_to_the_least_recently_used_slot():
    idle = [slot(0, [1, 2, 8], 3.0), slot(1, [1, 2, 9], 2.0)]
    chosen, reuse = slots.pick_slot([1, 2, 3], idle)
    assert (chosen.seq_id, reuse) == (1, 2)


def test_with_nothing_to_reuse_the_least_recently_used_slot_is_taken():
    idle = [slot(0, [7, 8], 2.0), slot(1, [9], 1.0), slot(2, [4, 4], 3.0)]
    chosen, reuse = slots.pick_slot([1, 2, 3], idle)
    assert (chosen.seq_id, reuse) == (1, 0)


def test_decode_runs_count_consecutive_sequence_ids():
    assert slots.decode_runs([0, 1, 2, 3]) == 1
    assert slots.decode_runs([0, 2, 5, 7]) == 4
    assert slots.decode_runs([7, 5, 6, 0]) == 2
    assert slots.decode_runs([]) == 0


def test_a_prompt_goes_beside_the_running_sequences_when_no_slot_holds_much_more_of_it():
    # Running: 0 and 2. Slots 1 and 3 hold the template's prefix (3 tokens), 4 nothing.
    idle = [slot(3, [1, 2, 3, 9], 0.0), slot(1, [1, 2, 3, 8], 5.0), slot(4, [], 1.0)]
    chosen, reuse = slots.pick_slot([1, 2, 3, 4, 5], idle, [0, 2], unified=False)
    assert (chosen.seq_id, reuse) == (1, 3)  # {0, 1, 2}: one graph run; slot 3 would make two
    # nothing held anywhere: the same rule, not the least recently used slot
    idle = [slot(5, [], 0.0), slot(1, [], 9.0)]
    assert slots.pick_slot([7, 8], idle, [0, 2], unified=False)[0].seq_id == 1


def test_a_slot_holding_much_more_of_the_prompt_wins_over_its_place():
    conversation = list(range(1, 200))
    idle = [slot(1, [], 0.0), slot(6, conversation, 5.0)]
    chosen, reuse = slots.pick_slot([*conversation, 300, 301], idle, [0, 2], unified=False)
    assert (chosen.seq_id, reuse) == (6, len(conversation))


def test_with_one_kv_pool_the_place_does_not_matter():
    idle = [slot(3, [1, 2, 9], 0.0), slot(1, [1, 2, 8], 5.0)]
    assert slots.pick_slot([1, 2, 3], idle, [0, 2], unified=True)[0].seq_id == 3  # least recently used


def test_clients_coming_and_going_keep_their_slots_together():
    """4 clients on 8 slots, each sending new prompts that share only the template's first tokens:
    the running sequences stay one graph run, where taking the least recently used slot of
    equals (the rule before) spreads them over all eight."""
    template = [1, 2, 3]

    def simulate(unified: bool) -> int:
        pool = [slot(i, template + [50 + i], float(i)) for i in range(8)]  # all used once before
        running: list[Slot] = []
        worst, clock, prompt = 0, 10.0, 100
        for _ in range(40):
            if len(running) == 4:  # the stream that started first finishes
                running.pop(0).choice = None
            idle = [s for s in pool if s not in running]
            chosen, _ = slots.pick_slot(template + [prompt, prompt + 1], idle, [s.seq_id for s in running],
                                        unified=unified)
            chosen.cached, chosen.last_used, chosen.choice = template + [prompt], clock, object()
            running.append(chosen)
            clock, prompt = clock + 1, prompt + 2
            worst = max(worst, slots.decode_runs(s.seq_id for s in running))
        return worst

    assert simulate(unified=False) == 1
    assert simulate(unified=True) > 1  # the pool's rule ignores places: what per-slot streams had


def test_a_one_token_prompt_spares_the_slot_that_starts_with_it():
    # The last prompt token is always evaluated, so a one-token prompt reuses nothing: the slot
    # whose cache it matches keeps its conversation, the least recently used one is taken.
    idle = [slot(0, [5, 6, 7], 9.0), slot(1, [8], 1.0)]
    chosen, reuse = slots.pick_slot([5], idle)
    assert (chosen.seq_id, reuse) == (1, 0)


def test_the_last_prompt_token_is_never_reused():
    idle = [slot(0, [1, 2, 3, 4, 5], 1.0)]
    assert slots.pick_slot([1, 2, 3], idle)[1] == 2
    assert slots.usable_prefix(10, 4) == 3 and slots.usable_prefix(2, 4) == 2


def test_a_saved_state_is_restored_only_for_a_real_gain():
    assert not slots.worth_restoring(10 + slots.MIN_RESTORE_GAIN - 1, 10)
    assert slots.worth_restoring(10 + slots.MIN_RESTORE_GAIN, 10)
    assert slots.worth_restoring(slots.MIN_RESTORE_GAIN, 0)


def test_extra_choices_take_the_least_recently_used_other_slots():
    idle = [slot(0, [], 4.0), slot(1, [], 1.0), slot(2, [], 3.0), slot(3, [], 2.0)]
    main = idle[1]
    assert [s.seq_id for s in slots.slots_for_copies(idle, main, 3)] == [3, 2]
    assert slots.slots_for_copies(idle, main, 1) == []
    assert slots.least_recently_used(idle) is main


def test_idle_slots_give_up_cells_least_recently_used_first_the_best_match_last():
    idle = [slot(0, [1, 2, 3], 1.0), slot(1, [9, 9], 3.0), slot(2, [], 0.0), slot(3, [8], 2.0)]
    assert [s.seq_id for s in slots.eviction_order(idle, [1, 2, 7])] == [3, 1, 0]
    # An empty best match has nothing to give.
    assert [s.seq_id for s in slots.eviction_order(idle[1:], [1, 2, 7])] == [3, 1]


def test_free_cells_count_cached_and_promised_prompt_tokens():
    table = [slot(0, [1, 2, 3], 0.0), slot(1, [], 0.0)]
    table[1].prefill = [4, 5]
    assert slots.free_cells(table, 10) == 5


def test_prompts_are_read_shortest_first_one_finished_per_step():
    # Two running streams take two batch tokens; the 30-token prompt is read alone, the 200-token
    # one waits for the next step.
    assert slots.plan_prefill([200, 30], used=2, n_batch=512) == [(1, 30)]


def test_short_prompts_share_a_step_until_it_uses_the_cores():
    short = slots.MIN_STEP_TOKENS // 4
    plan = slots.plan_prefill([short, short, short, 100], used=0, n_batch=512)
    assert plan[:3] == [(0, short), (1, short), (2, short)]
    # After three short prompts the step is still below MIN_STEP_TOKENS: the long one is read too.
    assert plan[3] == (3, 100)


def test_ties_keep_admission_order():
    assert slots.plan_prefill([40, 40], used=0, n_batch=512) == [(0, 40)]
    assert slots.plan_prefill([5, 5], used=0, n_batch=512) == [(0, 5), (1, 5)]


def test_a_long_prompt_is_spread_over_steps_within_the_batch():
    pending = [1000]
    steps = []
    while pending[0]:
        [(i, n)] = slots.plan_prefill(pending, used=3, n_batch=256)
        steps.append(n)
        pending[i] -= n
    assert steps == [253, 253, 253, 241]


def test_a_batch_full_of_running_streams_reads_no_prompt():
    assert slots.plan_prefill([10], used=64, n_batch=64) == []


@pytest.mark.parametrize("n_parallel", [1, 2, 3])
def test_a_conversation_comes_back_to_its_slot(n_parallel):
    """Admission as the scheduler runs it, with a fake decoder (a slot caches what it is given):
    conversations pass through the slots; each follow-up turn finds the slot holding its history
    while there are enough slots, else starts over in the least recently used one."""
    table = [Slot(i) for i in range(n_parallel)]
    clock = 0.0

    def turn(prompt: list[int]) -> int:
        nonlocal clock
        chosen, reuse = slots.pick_slot(prompt, table)
        chosen.cached = chosen.cached[:reuse] + prompt[reuse:] + [99]  # the prompt, then one reply token
        clock += 1
        chosen.last_used = clock
        return reuse

    histories = {c: [c * 10 + 1, c * 10 + 2, c * 10 + 3] for c in range(3)}
    for history in histories.values():
        assert turn(history) == 0
    for c, history in histories.items():
        follow_up = [*history, 99, c * 10 + 4]
        expected = len(history) + 1 if n_parallel == 3 else 0
        assert turn(follow_up) == expected


class Entry:
    """A prompt-cache entry as `place` sees it: its size."""

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens


def test_place_keeps_the_slot_prefix_when_no_saved_state_beats_it():
    idle = [slot(0, [1, 2, 3, 4], 1.0), slot(1, [], 0.0)]
    plan = slots.place([1, 2, 3, 4, 5, 6], idle, [], unified=False)
    assert (plan.slot.seq_id, plan.reuse, plan.entry) == (0, 4, None)
    entry = Entry(6)  # covers 5 tokens: not MIN_RESTORE_GAIN more than the slot's 4
    assert slots.place([1, 2, 3, 4, 5, 6], idle, [], unified=False, saved=(entry, 5)).entry is None


def test_place_restores_a_saved_state_that_covers_more_into_the_slot_beside_the_running_ones():
    idle = [slot(1, [1, 2], 1.0), slot(3, [9], 0.0), slot(5, [], 0.5)]
    prompt = list(range(1, 21))
    entry = Entry(30)
    plan = slots.place(prompt, idle, running=[0], unified=False, saved=(entry, 30))
    assert plan.entry is entry and plan.target.seq_id == 1  # beside sequence 0
    assert plan.found == 19  # not the prompt's last token: it is evaluated for the first logits
    assert (plan.slot.seq_id, plan.reuse) == (1, 2)  # the fallback should the restore fail


def test_place_with_kvu_restores_only_what_fits_in_the_pool():
    idle = [slot(0, [], 0.0)]
    prompt = list(range(1, 21))
    assert slots.place(prompt, idle, [], unified=True, saved=(Entry(30), 20), free=29).entry is None
    assert slots.place(prompt, idle, [], unified=True, saved=(Entry(30), 20), free=30).entry is not None


def test_place_keeps_images_whole():
    from edge_llm.engines.media import ImageSpan

    image = ImageSpan(start=3, n_tokens=4, n_pos=4, digest="ab" * 32)
    idle = [slot(0, [1, 2, 3, -1, -2], 0.0)]
    plan = slots.place([1, 2, 3, -1, -2, -3, -4, 8], idle, [], unified=False, images=[image])
    assert plan.reuse == 3  # the slot holds half the image: it is evaluated again from its start
