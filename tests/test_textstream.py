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
