"""scripts/seesaw_trace.py's parsing of the seesaw kernel's timeline (the device part needs a GPU and a
-DKVPAGER_TRACE build; the arithmetic on the printed events does not)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def trace():
    sys.path.insert(0, str(SCRIPTS))  # the script imports its sibling device_printf
    try:
        spec = importlib.util.spec_from_file_location("seesaw_trace", SCRIPTS / "seesaw_trace.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def synthetic(trace, pairs: int, period: int, wg1_shift: int) -> dict[int, list[tuple[int, int]]]:
    """Two warpgroups' events: a segment start, then `pairs` pairs of `period` cycles, each with a
    `max` event 100 cycles in; then the loop end and a second segment that must be ignored."""
    ev = {name: i for i, name in enumerate(trace.NAMES)}
    out = {}
    for wg in (0, 1):
        shift = wg * wg1_shift
        e = [(ev["start"], 0), (ev["segment"], 10), (ev["Q"], 500), (ev["first-S"], 1000 + shift)]
        for k in range(pairs):
            origin = 1000 + k * period
            e += [(ev["max"], origin + 100 + shift), (ev["pair"], origin + period + shift)]
        e += [(ev["loop-end"], 1000 + pairs * period + 50), (ev["segment"], 10**6), (ev["pair"], 2 * 10**6)]
        out[wg] = e
    return out


def test_pairs_are_cut_at_their_pair_event_and_stop_at_the_loop_end(trace) -> None:
    events = synthetic(trace, pairs=10, period=6000, wg1_shift=700)
    pairs = trace.first_segment_pairs(events[0])
    assert len(pairs) == 10
    assert [trace.NAMES[e] for e, _ in pairs[0]] == ["max", "pair"]
    assert pairs[-1][-1][1] == 1000 + 10 * 6000


def test_report_gives_offsets_from_the_end_of_wg0s_previous_pair(trace, capsys) -> None:
    from kvpager.benchmarks import kernel as bench

    trace.report(bench.Case(128, 2, 128, 8192, False), synthetic(trace, pairs=12, period=6000, wg1_shift=700))
    text = capsys.readouterr().out
    assert "12 pairs" in text
    assert "wg0: max 100 (100..100) | pair 6000 (6000..6000)" in text
    assert "wg1: max 800 (800..800) | pair 6700 (6700..6700)" in text
    assert "period median 6000 cycles" in text
    assert "segment start (cycles): wg0 start->segment 10, segment->Q 490, Q->first-S 500 | wg1 " in text
    assert "Q->first-S 1200" in text


def test_too_short_a_segment_is_said_not_averaged(trace, capsys) -> None:
    from kvpager.benchmarks import kernel as bench

    trace.report(bench.Case(1, 1, 128, 128, False), synthetic(trace, pairs=2, period=6000, wg1_shift=0))
    text = capsys.readouterr().out
    assert "(too few pairs for the steady state)" in text
    assert "period median" not in text
    # ... but the segment's start and its whole span still print (the second segment is not counted)
    assert "segment start (cycles): wg0 start->segment 10, segment->Q 490, Q->first-S 500 | wg1 " in text
    assert "segment whole (cycles): wg0 start->first-S 1000, first-S->loop-end 12050, total 13050 | wg1 " in text


def test_whole_span_ends_at_the_first_segments_epilogue(trace) -> None:
    ev = {name: i for i, name in enumerate(trace.NAMES)}
    events = [(ev["start"], 0), (ev["segment"], 10), (ev["first-S"], 900), (ev["pair"], 5000),
              (ev["loop-end"], 9000), (ev["epilogue"], 9800), (ev["segment"], 9900), (ev["epilogue"], 20000)]
    assert trace.whole_spans(events) == "start->first-S 900, first-S->loop-end 8100, loop-end->epilogue 800, total 9800"
    assert trace.whole_spans([]) == "(no stamps)"


def test_reload_spans_run_from_the_reloader_to_the_readers_s_issue(trace) -> None:
    ev = {name: i for i, name in enumerate(trace.NAMES)}
    pair0 = [(ev["remote-done"], 5000), (ev["S-issued"], 6500), (ev["pair"], 6700)]
    pair1 = [(ev["remote-done"], 4300), (ev["S-issued"], 7500), (ev["pair"], 7700)]
    spans = trace.reload_spans({0: [pair0] * 5, 1: [pair1] * 5}, first=1, n=5)
    assert spans == {"S0 late (buf0 4-7, WG1)": [6500 - 4300] * 4, "S1 (buf1 0-3+8, WG0)": [7500 - 5000] * 4}


def test_refill_issue_spans_pair_each_refill_with_the_read_that_freed_it(trace) -> None:
    ev = {name: i for i, name in enumerate(trace.NAMES)}
    wg0 = [(ev["pv-done"], 2800), (ev["refill-b0"], 3100), (ev["remote-done"], 5500), (ev["refill-b1"], 5900),
           (ev["pair"], 6800)]
    wg1 = [(ev["pv-done"], 3900), (ev["refill-b1"], 4050), (ev["remote-done"], 4500), (ev["refill-b0"], 4700),
           (ev["pair"], 7900)]
    spans = trace.refill_issue_spans({0: [wg0] * 4, 1: [wg1] * 4}, first=1, n=4)
    assert spans == {"WG0 buf0 0-3+8": [300] * 3, "WG0 buf1 0-3+8": [400] * 3,
                     "WG1 buf1 4-7": [150] * 3, "WG1 buf0 4-7": [200] * 3}
    # A build without the stamps (before s14) prints no such line.
    assert trace.refill_issue_spans({0: [wg0[2:3]] * 4, 1: [wg1[:1]] * 4}, first=1, n=4) == {}
