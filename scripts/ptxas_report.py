"""Registers, stack and spills per kernel from a build log made with `--ptxas-options=-v`.

    python scripts/ptxas_report.py build.log [--main REGEX]

Prints one row per entry function (demangled when cu++filt / c++filt is found), main kernels
(names matching --main) marked with '*', and exits 0; a spill in a main kernel is called out.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
SERIALIZED = re.compile(r"C7520.*in the function '([^']+)'")
USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")


def parse(lines: list[str]) -> dict[str, dict]:
    kernels: dict[str, dict] = {}
    entry = props = None
    for line in lines:
        if m := ENTRY.search(line):
            entry = m.group(1)
            kernels[entry] = {"arch": m.group(2), "regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0}
        elif m := PROPS.search(line):
            props = m.group(1)
        elif (m := FRAME.search(line)) and props in kernels:
            k = kernels[props]
            k["stack"], k["spill_st"], k["spill_ld"] = map(int, m.groups())
        elif (m := USED.search(line)) and entry in kernels:
            kernels[entry]["regs"] = int(m.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    try:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30)
        out = res.stdout.splitlines()
        return out if len(out) == len(names) else names
    except (OSError, subprocess.SubprocessError):
        return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--main", default=r"decode_kernel|mla_decode|splitkv|fwd_kernel",
                        help="regex of the main kernels' demangled names")
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        lines = f.readlines()
    kernels = parse(lines)
    # C7520: ptxas serialized every wgmma of a kernel (a compiler-inserted warpgroup.arrive on a
    # divergent path): as costly as a spill, so it is reported the same way.
    serialized = sorted({m.group(1) for m in map(SERIALIZED.search, lines) if m})
    if not kernels:
        print("ptxas: no 'Compiling entry function' lines in the log (nothing recompiled? run with CLEAN=1)")
        return 0
    names = list(kernels)
    pretty = demangle(names)
    main_re = re.compile(args.main)
    print(f"{'':1} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    spilled = []
    for name, shown in sorted(zip(names, pretty), key=lambda x: x[1]):
        k = kernels[name]
        is_main = bool(main_re.search(shown)) and not re.search(r"combine|metadata", shown)
        shown = shown if len(shown) <= 140 else shown[:137] + "..."
        print(f"{'*' if is_main else ' '} {k['regs'] if k['regs'] is not None else '?':>4} {k['stack']:>5} "
              f"{k['spill_st']:>8} {k['spill_ld']:>8}  {shown}")
        if is_main and (k["spill_st"] or k["spill_ld"]):
            spilled.append(shown)
    if spilled:
        print(f"ptxas: SPILLS in {len(spilled)} main kernel instantiation(s): keep the main kernel at 0 spill bytes")
    else:
        print("ptxas: main kernels spill-free")
    for name in serialized:
        print(f"ptxas: WGMMA SERIALIZED (C7520) in {name}")
    if not serialized:
        print("ptxas: no wgmma serialization (C7520)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
