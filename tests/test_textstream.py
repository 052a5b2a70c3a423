from edge_llm.engines.textstream import TextAssembler


def feed(asm, pieces):
    out = [asm.push(p) for p in pieces]
    out.append(asm.finish())
    return out


def test_utf8_split_across_tokens_is_held_until_complete():
    data = "你好".encode()
    asm = TextAssembler()
    out = feed(asm, [data[:1], data[1:4], data[4:]])
    assert out == ["", "你", "好", ""]


def test_incomplete_character_at_the_end_is_dropped():
    asm = TextAssembler()
    assert feed(asm, [b"a", "好".encode()[:2]]) == ["a", "", ""]


def test_invalid_bytes_become_replacement_characters():
    asm = TextAssembler()
    assert "".join(feed(asm, [b"a\xff", b"b"])) == "a\ufffdb"


def test_stop_string_spanning_tokens_is_cut_and_not_leaked():
    asm = TextAssembler(stop=("END",))
    out = feed(asm, [b"abc E", b"N", b"D more"])
    assert "".join(out) == "abc "
    assert asm.stopped
    # Nothing of the stop string was shown before it was known to be one.
    assert out[0] == "abc " and out[1] == ""


def test_stop_string_included_when_asked():
    asm = TextAssembler(stop=("END",), include_stop=True)
    assert "".join(feed(asm, [b"abc E", b"ND more"])) == "abc END"


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    asm = TextAssembler(stop=("END",))
    out = feed(asm, [b"abc E", b"x"])
    assert out == ["abc ", "Ex", ""]
    assert not asm.stopped


def test_earliest_of_several_stops_wins():
    asm = TextAssembler(stop=("world", "lo"))
    assert "".join(feed(asm, [b"hello world"])) == "hel"


def _reference_cut(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """The answer ends where a stop string is first complete; the longest of those ending there."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def test_stop_strings_match_a_reference_whatever_the_token_boundaries():
    import random

    rng = random.Random(7)
    for _ in range(400):
        alphabet = "ab\u00e9\u4e16"
        stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6))})
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        data = text.encode("utf-8")
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8)))) if len(data) > 1 else []
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        for include in (False, True):
            asm = TextAssembler(stop=stops, include_stop=include)
            shown = "".join(feed(asm, pieces))
            answer, stop = _reference_cut(text, stops)
            assert shown == (answer + (stop or "") if include else answer), (text, stops, pieces)
            assert asm.stopped == (stop is not None)


def test_text_that_may_begin_a_stop_string_is_held_back_and_no_more():
    asm = TextAssembler(stop=("abcd", "bx"))
    assert asm.push(b"zab") == "z"  # "ab" may begin "abcd", "b" may begin "bx"
    assert asm.push(b"c") == ""  # "abc"
    assert asm.push(b"e") == "abce"
    assert asm.push(b"b") == "" and asm.push(b"x") == "" and asm.stopped


def test_many_stop_strings_are_read_in_one_pass():
    """The per-token check does not grow with the number of stop strings: each character takes
    one step of the automaton, and its fallbacks are paid for by the steps before (at most one
    each), however many stop strings share a prefix with the text."""
    from edge_llm.engines import textstream

    stops = tuple(f"stop word {i}!" for i in range(64))
    automaton = textstream.StopStrings(stops)
    calls = 0
    goto, fail = automaton.goto, automaton.fail

    def counted(state, ch):
        nonlocal calls
        calls += 1
        while state and ch not in goto[state]:
            state = fail[state]
            calls += 1
        return goto[state].get(ch, 0)

    automaton.step = counted
    textstream.stop_strings.cache_clear()
    asm = TextAssembler(stop=stops)
    asm._stops = automaton
    text = "stop word 1 and stop word 12 and stop word 63 then more words " * 20
    for ch in text:
        asm.push(ch.encode())
    assert calls <= 2 * len(text) and not asm.stopped
