"""transformers (5.25 and later) imports the Hugging Face `kernels` distribution when it is
imported itself. Run from a kvpager source checkout (`python -m pytest`, `python -m kvpager...`),
the current directory is on sys.path and the name `kernels` resolves to our CUDA source directory
(kernels/, which is installed as kvpager.kernels), so that import fails with
"cannot import name 'CUDAProperties' from 'kernels'".

prefer_installed_kernels() imports the installed distribution first, with the checkout's root left
out of sys.path for that one import; every later `import kernels` (transformers' included) then
gets it from sys.modules. Call it before importing transformers.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

# The directory that holds kernels/ when kvpager is installed from a source checkout (editable).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _is_source_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == SOURCE_ROOT
    except OSError:
        return False


def prefer_installed_kernels() -> None:
    """Make `import kernels` mean the installed Hugging Face distribution, if there is one.

    Invariants: sys.path is unchanged afterwards; without the distribution nothing is imported
    (transformers then does not import it either); a `kernels` already imported is left alone."""
    if "kernels" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not _is_source_root(entry)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed (or broken): transformers' own check decides what happens next
    finally:
        sys.path[:] = saved


def import_transformers():
    """`import transformers`, after prefer_installed_kernels()."""
    prefer_installed_kernels()
    import transformers

    return transformers
