"""Where a built kernel spills: runs `cuobjdump -sass` on the extension and prints, for every kernel
whose name contains the filter, each local-memory instruction (STL / LDL) with the lines around it,
so a spill can be placed in the code (which warpgroup's region, which loop). Device machines only
(cuobjdump ships with the CUDA toolkit there, not here).

    python scripts/sass_spills.py [name filter, default "seesaw"] [context lines, default 6]
"""
from __future__ import annotations

import glob
import re
import subprocess
import sys


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "seesaw"
    context = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    libs = glob.glob("kernels/_C*.so") + glob.glob("kvpager/kernels/_C*.so")
    if not libs:
        print("sass_spills: no built extension (kernels/_C*.so)")
        return 1
    sass = subprocess.run(["cuobjdump", "-sass", libs[0]], capture_output=True, text=True, check=True).stdout
    kernels = re.split(r"\n\s*Function : ", sass)
    for body in kernels[1:]:
        lines = body.splitlines()
        if name not in lines[0]:
            continue
        hits = [i for i, line in enumerate(lines) if re.search(r"\b(STL|LDL)\b", line)]
        setmax = [i for i, line in enumerate(lines) if "USETMAXREG" in line]
        print(f"== {lines[0][:150]}: {len(lines)} lines, {len(hits)} STL/LDL, USETMAXREG at lines {setmax}")
        shown = -1
        for i in hits:
            lo = max(i - context, shown + 1)
            for j in range(lo, min(i + context + 1, len(lines))):
                print(f"{j:6d}{'*' if j == i else ' '} {lines[j].strip()[:140]}")
                shown = j
            print("   ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
