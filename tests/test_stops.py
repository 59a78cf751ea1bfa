"""Proxy-side stop strings: nothing past a stop string leaks, nothing else is held back."""

from inferbridge.stops import StopCutter


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
