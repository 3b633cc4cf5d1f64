"""One CTA's timeline of the seesaw kernel, per pair of pages: when each warpgroup reaches each
hand-off, relative to the end of WG0's previous pair. Needs a build with
KVPAGER_NVCC_EXTRA=-DKVPAGER_TRACE (the kernel records clock64() at named points; a small kernel
prints them afterwards, because a printf in the decode kernel serializes its wgmmas).

    python scripts/seesaw_trace.py [--case b,s_q,h_q,s_k ...] [--orders 8,10] [--fp8]

For each case: the steady-state pairs of the traced CTA's first segment (pairs 3..40), the median
cycle of every event after the pair's origin, with its spread (10th..90th percentile), per
warpgroup, in the order the events happen; then the pair period, and for the two reloads that feed
an S GEMM's last tiles, the cycles from the reload to that S GEMM's issue; and what each refill's
TMA issue costs (builds since s14). Events (decode_seesaw_kernel.cuh):
  max        page maxima of S            scale-in     the other warpgroup's scale read
  P          P exponentiated and packed  pv-issued    own P V issued     pv-done   own P V complete
  P-stored   WG0: P0' stored             P-in         the other's P ready
  remote-iss P_other V issued            S-early      WG0: next S0's first five tiles issued
  remote-done P_other V complete         S-issued     next S fully issued   pair  next S complete
  refill-b0 / refill-b1  the warpgroup's TMA refill of buffer 0 / 1 issued (after its issuer's loads)
With --fp8 (a 656-byte FP8 cache) the converter warpgroup's first thread stamps each of a pair's four
4-tile groups (step 0: buffer 0 tiles 0-3, 1: buffer 1 4-7, 2: buffer 0 4-7, 3: buffer 1 0-3):
  cv-landed-k  the group's first tile has landed    cv-done-k  its last tile is converted
printed for the pages whose S GEMMs the consumers issue in the same pair.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics

import torch
from device_printf import device_printf

from kvpager import kernels
from kvpager.benchmarks import kernel as bench

NAMES = ["start", "segment", "Q", "first-S", "pair", "loop-end", "epilogue", "end", "max", "scale-in", "P",
         "pv-issued", "pv-done", "P-stored", "P-in", "remote-iss", "S-early", "remote-done", "S-issued",
         "refill-b0", "refill-b1"] + [f"cv-landed-{k}" for k in range(4)] + [f"cv-done-{k}" for k in range(4)] + [
    "epi-sync", "epi-rowsum", "epi-staged", "epi-scaled", "epi-pass-0", "epi-pass-1"]
CV_LANDED, CV_DONE = NAMES.index("cv-landed-0"), NAMES.index("cv-done-0")
PAIR = NAMES.index("pair")
LINE = re.compile(r"SEESAW wg (\d) #(\d+) event (\d+) cycle (\d+)")
DEFAULT_CASES = ["128,2,128,8192", "128,1,128,8192", "64,1,128,1024"]


def capture(case: bench.Case, fp8_cache: bool = False) -> dict[int, list[tuple[int, int]]]:
    x = bench.make_inputs(case, torch.bfloat16, 0)
    if fp8_cache:
        from kvpager import fp8
        x["k_cache"] = fp8.quantize(x["k_cache"])
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], case.s_q * case.h_q // case.h_kv, case.h_kv)
    with device_printf() as printed:
        for _ in range(3):  # the last call's lines are the ones kept
            torch.empty(256 << 20, dtype=torch.int8, device="cuda").zero_()  # cold L2
            kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], bench.DV,
                                           meta, splits, causal=True, is_fp8_kvcache=fp8_cache)
        text = printed()
    events: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
    for wg, idx, ev, cyc in LINE.findall(text):
        if int(idx) == 0:
            events[int(wg)] = []
        events[int(wg)].append((int(ev), int(cyc)))
    return events


def first_segment_pairs(evs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The events of each pair of the first segment (a pair ends at its `pair` event)."""
    pairs, cur, started = [], [], False
    for ev, cyc in evs:
        if NAMES[ev] == "first-S":
            started = True
            continue
        if not started:
            continue
        if NAMES[ev] == "loop-end":
            break
        cur.append((ev, cyc))
        if ev == PAIR:
            pairs.append(cur)
            cur = []
    return pairs


# The S GEMM whose last tiles a reload supplies (order 11's reload rule, decode_seesaw_kernel.cuh):
# WG1 refills buffer 0's tiles 4-7 after its remote P V, and WG0's next S0 reads them last; WG0
# refills buffer 1's tiles 0-3 and 8 after its remote P V, and WG1's next S1 reads them last.
RELOADS = {"S0 late (buf0 4-7, WG1)": (1, "remote-done", 0, "S-issued"),
           "S1 (buf1 0-3+8, WG0)": (0, "remote-done", 1, "S-issued")}


def reload_spans(pairs: dict[int, list], first: int, n: int) -> dict[str, list[int]]:
    """Per steady pair, cycles from the reloading warpgroup's event to the reading one's S issue."""
    out: dict[str, list[int]] = {}
    for name, (wg_from, ev_from, wg_to, ev_to) in RELOADS.items():
        a, b = NAMES.index(ev_from), NAMES.index(ev_to)
        for k in range(first, n):
            start = [c for e, c in pairs[wg_from][k] if e == a]
            end = [c for e, c in pairs[wg_to][k] if e == b]
            if start and end:
                out.setdefault(name, []).append(end[0] - start[0])
    return out


# The TMA issue of each refill: from the event after which a warpgroup refills a buffer (its last read
# of it complete) to the refill's stamp, i.e. the warpgroup sync plus its issuer's 4-5 tile loads.
REFILLS = {"WG0 buf0 0-3+8": (0, "pv-done", "refill-b0"), "WG0 buf1 0-3+8": (0, "remote-done", "refill-b1"),
           "WG1 buf1 4-7": (1, "pv-done", "refill-b1"), "WG1 buf0 4-7": (1, "remote-done", "refill-b0")}


def refill_issue_spans(pairs: dict[int, list], first: int, n: int) -> dict[str, list[int]]:
    """Per steady pair, cycles a warpgroup spends issuing a refill (only where the stamps exist)."""
    out: dict[str, list[int]] = {}
    for name, (wg, ev_from, ev_to) in REFILLS.items():
        a, b = NAMES.index(ev_from), NAMES.index(ev_to)
        for k in range(first, n):
            start = [c for e, c in pairs[wg][k] if e == a]
            end = [c for e, c in pairs[wg][k] if e == b and start and c >= start[0]]
            if start and end:
                out.setdefault(name, []).append(end[0] - start[0])
    return out


def report(case: bench.Case, events: dict[int, list[tuple[int, int]]], first: int = 3, last: int = 40) -> None:
    pairs = {wg: first_segment_pairs(events[wg]) for wg in (0, 1)}
    n = min(len(pairs[0]), len(pairs[1]), last)
    print(f"b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}: {len(pairs[0])} pairs in the traced "
          f"segment; steady pairs {first}..{n - 1}; cycles after the end of WG0's previous pair")
    if n - first < 3:
        print("  (too few pairs for the steady state)")
        print_segment_spans(events)
        return
    periods = [pairs[0][k][-1][1] - pairs[0][k - 1][-1][1] for k in range(first, n)]
    for wg in (0, 1):
        offsets: dict[int, list[int]] = {}
        for k in range(first, n):
            origin = pairs[0][k - 1][-1][1]
            for ev, cyc in pairs[wg][k]:
                offsets.setdefault(ev, []).append(cyc - origin)
        order = sorted(offsets, key=lambda e: statistics.median(offsets[e]))
        cells = []
        for ev in order:
            v = sorted(offsets[ev])
            cells.append(f"{NAMES[ev]} {statistics.median(v):.0f} ({v[len(v) // 10]}..{v[(9 * len(v)) // 10]})")
        print(f"  wg{wg}: " + " | ".join(cells))
    print(f"  period median {statistics.median(periods):.0f} cycles (min {min(periods)}, max {max(periods)})")
    spans = reload_spans(pairs, first, n)
    if spans:
        print("  reload -> next S issued (an upper bound on the TMA latency the S GEMM waited for): "
              + " | ".join(f"{name} {statistics.median(v):.0f}" for name, v in spans.items()))
    issue = refill_issue_spans(pairs, first, n)
    if issue:
        print("  refill TMA issue (sync + loads, cycles): "
              + " | ".join(f"{name} {statistics.median(v):.0f}" for name, v in issue.items()))
    if events.get(2):
        print("  converter: " + converter_cells(events[2], pairs[0], first, n))
    print_segment_spans(events)


def print_segment_spans(events: dict[int, list[tuple[int, int]]]) -> None:
    print("  segment start (cycles): " + " | ".join(f"wg{wg} {start_spans(events[wg])}" for wg in (0, 1)))
    print("  segment whole (cycles): " + " | ".join(f"wg{wg} {whole_spans(events[wg])}" for wg in (0, 1)))
    for wg in (0, 1):
        rows = segment_rows(events[wg])
        if len(rows) > 1:
            print(f"  segments of wg{wg} (cycles; as far as the trace buffer reaches): " + " | ".join(rows))


def segment_rows(events: list[tuple[int, int]]) -> list[str]:
    """Every segment the trace holds (s26): from the previous segment's output stored to this one's first
    S done (for the first: from the kernel start), its pairs (first S -> loop end) and its epilogue (loop
    end -> output stored). Later segments run warm code and start out of step with other CTAs, so their
    start against the first's separates the start burst and cold code from a segment's own cost."""
    rows, mark, seg = [], {}, -1
    for e, c in events:
        name = NAMES[e]
        if name == "start":
            mark["prev"] = c
        elif name == "segment":
            seg += 1
            mark = {"prev": mark.get("prev", c)}
        elif name in ("first-S", "loop-end", "epilogue"):
            mark[name] = c
            if name == "epilogue" and {"first-S", "loop-end"} <= mark.keys():
                rows.append(f"#{seg} start {mark['first-S'] - mark['prev']}, pairs {mark['loop-end'] - mark['first-S']}, "
                            f"epilogue {c - mark['loop-end']}")
                mark = {"prev": c}
    return rows


def converter_cells(evs: list[tuple[int, int]], wg0_pairs: list, first: int, n: int) -> str:
    """The converter's group stamps of the first segment, pair p + 1's groups against WG0's pair p
    (whose S GEMMs read them), as offsets from the end of WG0's pair p - 1, median (10th..90th)."""
    groups: list[dict[int, int]] = []  # per group of the first segment: event -> cycle
    seen_segment = 0
    for ev, cyc in evs:
        if NAMES[ev] == "segment":
            seen_segment += 1
            if seen_segment > 1:
                break
            continue
        if ev >= CV_DONE:
            if groups:
                groups[-1][ev] = cyc
        elif ev >= CV_LANDED:
            groups.append({ev: cyc})
    offsets: dict[int, list[int]] = {}
    for k in range(first, n):
        origin = wg0_pairs[k - 1][-1][1]
        for g in groups[4 * (k + 1): 4 * (k + 2)]:
            for ev, cyc in g.items():
                offsets.setdefault(ev, []).append(cyc - origin)
    cells = []
    for ev in sorted(offsets, key=lambda e: statistics.median(offsets[e])):
        v = sorted(offsets[ev])
        cells.append(f"{NAMES[ev]} {statistics.median(v):.0f} ({v[len(v) // 10]}..{v[(9 * len(v)) // 10]})")
    return " | ".join(cells) if cells else "(no stamps)"


def start_spans(events: list[tuple[int, int]]) -> str:
    """The first segment's start as spans: kernel start -> segment -> Q landed -> first S done."""
    stamps = {}
    for e, c in events[:8]:
        stamps.setdefault(NAMES[e], c)
    names = [n for n in ("start", "segment", "Q", "first-S") if n in stamps]
    return ", ".join(f"{a}->{b} {stamps[b] - stamps[a]}" for a, b in zip(names, names[1:]))


def whole_spans(events: list[tuple[int, int]]) -> str:
    """The first segment end to end: kernel start -> first S done -> pair loop over -> output
    stored, so the CTA's life can be set against the kernel's measured time."""
    stamps: dict[str, int] = {}
    for e, c in events:
        stamps.setdefault(NAMES[e], c)
        if NAMES[e] == "epilogue":
            break
    names = [n for n in ("start", "first-S", "loop-end", "epi-sync", "epi-rowsum", "epi-scaled", "epi-pass-0",
                         "epi-pass-1", "epi-staged", "epilogue") if n in stamps]
    spans = ", ".join(f"{a}->{b} {stamps[b] - stamps[a]}" for a, b in zip(names, names[1:]))
    return f"{spans}, total {stamps[names[-1]] - stamps[names[0]]}" if len(names) > 1 else "(no stamps)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="b,s_q,h_q,s_k (repeatable)")
    ap.add_argument("--fp8", action="store_true", help="trace on a 656-byte FP8 cache (converter stamps too)")
    ap.add_argument("--orders", default="",
                    help="hand-off orders to trace (KVPAGER_SEESAW_ORDER), e.g. 11,15")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    for spec in args.case or DEFAULT_CASES:
        b, s_q, h_q, s_k = (int(v) for v in spec.split(","))
        case = bench.Case(b, s_q, h_q, s_k, False)
        for order in args.orders.split(",") if args.orders else [""]:
            if order:
                os.environ["KVPAGER_SEESAW_ORDER"] = order
                print(f"hand-off order {order}:")
            report(case, capture(case, args.fp8))


if __name__ == "__main__":
    main()
