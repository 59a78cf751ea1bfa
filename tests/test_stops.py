"""Proxy-side stop strings: nothing past a stop string leaks, nothing else is held back."""

from inferbridge.stops import StopCutter, covering_stops


def run(pieces, stops):
    cutter = StopCutter(stops)
    out = [cutter.feed(p) for p in pieces]
    return out, cutter.flush(), cutter.stopped


def test_stop_split_across_pieces_is_cut():
    out, rest, stopped = run(["Hello ##", "# END", " more"], ["### END"])
    assert "".join(out) + rest == "Hello "
    assert stopped


def test_only_a_possible_prefix_is_held_back():
    out, rest, stopped = run(["abc#", "x"], ["##"])
    assert out == ["abc", "#x"] and rest == "" and not stopped


def test_no_stop_passes_through_and_flushes():
    out, rest, stopped = run(["a", "b#"], ["#!"])
    assert "".join(out) + rest == "ab#" and not stopped


def test_earliest_of_several_stops_wins():
    out, _, stopped = run(["one TWO three ONE"], ["ONE", "TWO"])
    assert out == ["one "] and stopped


# -- covering_stops: the stops a backend needs to halt at all of them -------------------------
def test_a_stop_containing_another_is_covered_by_it():
    assert covering_stops(["\n<bot>:", "<bot>:"]) == ["<bot>:"]
    assert covering_stops(["<bot>:", "\n<bot>:"]) == ["<bot>:"]
    assert covering_stops(["<|im_end|>\n", "x<|im_end|>y", "<|im_end|>"]) == ["<|im_end|>"]
    template = ["\n<human>:", "\n<bot>:", "<human>:", "<bot>:"]  # human_bot's defaults
    assert covering_stops(template) == ["<human>:", "<bot>:"]


def test_covering_is_transitive_and_partial_overlaps_are_kept():
    assert covering_stops(["abc", "b", "ab"]) == ["b"]  # "ab" and "abc" both contain "b"
    # overlapping but neither contains the other: both are needed
    assert covering_stops(["ab", "bc"]) == ["ab", "bc"]
    assert covering_stops(["User:", "user:"]) == ["User:", "user:"]  # case matters


def test_covering_drops_duplicates_and_keeps_order():
    assert covering_stops(["C", "A", "C", "B", "A"]) == ["C", "A", "B"]
    assert covering_stops(["END", "\nEND", "###", "END"]) == ["END", "###"]


def test_covering_of_nothing_and_of_empty_strings():
    assert covering_stops([]) == []
    assert covering_stops(()) == []
    # an empty string is no stop at all (it must not "cover" every other one)
    assert covering_stops(["", "a", ""]) == ["a"]
    assert covering_stops([""]) == []


def test_covered_stops_still_decide_where_the_text_is_cut():
    # "<bot>:" halts generation, but "\n<bot>:" starts earlier: the cut uses every stop
    stops = ["\n<bot>:", "<bot>:"]
    out, _, stopped = run(["hi\n<bot>: more"], stops)
    assert out == ["hi"] and stopped
    out, _, stopped = run(["hi\n<bot>: more"], covering_stops(stops))
    assert out == ["hi\n"] and stopped


def _held_back(text: str, stops: list[str]) -> int:
    """What must be held back after `text` (with no stop in it): the longest suffix that
    is a proper prefix of some stop, found the slow, obvious way."""
    return max(
        (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
        default=0,
    )


def test_the_cutter_agrees_with_the_obvious_rule_on_random_streams():
    """Random stops and texts over a small alphabet (borders, overlaps, repeats), fed in
    random pieces: what is emitted, what is held back and where it stops are exactly what
    the obvious (quadratic) rule says."""
    import random

    rng = random.Random(20261208)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in "xyz"]
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 40)))
        cutter = StopCutter(stops)
        emitted, fed = "", ""
        i = 0
        while i < len(text) and not cutter.stopped:
            piece = text[i : i + rng.randint(1, 5)]
            i += len(piece)
            fed += piece
            emitted += cutter.feed(piece)
            if not cutter.stopped:
                assert len(fed) - len(emitted) == _held_back(fed, stops), (stops, fed)
        emitted += cutter.flush()
        # a stream stops on the piece that completes a stop; it is cut where the earliest
        # stop complete by then starts
        found = [at for at in (fed.find(s) for s in stops) if at != -1]
        assert cutter.stopped == bool(found), (stops, fed)
        assert emitted == (fed[: min(found)] if found else fed), (stops, fed)
