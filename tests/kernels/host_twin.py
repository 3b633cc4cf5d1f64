"""Building the host twins (tests/kernels/*_twin.cpp): kernel headers from kernels/csrc compiled
by the host C++ compiler, so their index math and schedules run in CPU tests. Modules import
`needs_cxx` as their pytestmark and build their twin once per module with `build_twin`."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler for the host twin")


def build_twin(name: str, out_dir: Path) -> Path:
    """Compiles tests/kernels/<name>.cpp against kernels/csrc (warnings are errors); returns the binary."""
    exe = out_dir / name
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    f"-I{ROOT / 'kernels' / 'csrc'}", str(ROOT / "tests" / "kernels" / f"{name}.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True, timeout=300)
    return exe
