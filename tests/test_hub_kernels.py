"""kvpager.hub_kernels: from a source checkout, `import kernels` must not pick our CUDA source
directory over the installed Hugging Face distribution (transformers >= 5.25 imports it)."""
import importlib.util
import sys
from pathlib import Path

import pytest

from kvpager import hub_kernels


SHADOW = hub_kernels.SOURCE_ROOT / "kernels"  # our CUDA sources, importable as `kernels` from the root


def _is_shadow(path: str | None) -> bool:
    return Path(path or "").resolve().parent == SHADOW


def _installed_kernels() -> bool:
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not hub_kernels._is_source_root(p)]
    try:
        spec = importlib.util.find_spec("kernels")
    finally:
        sys.path[:] = saved
    return spec is not None and not _is_shadow(spec.origin)


def test_kernels_resolves_to_the_installed_distribution_from_a_checkout(monkeypatch):
    if not _installed_kernels():
        pytest.skip("the Hugging Face `kernels` distribution is not installed here")
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    monkeypatch.setattr(sys, "path", [str(hub_kernels.SOURCE_ROOT), *sys.path])  # as `python -m` does
    assert _is_shadow(importlib.util.find_spec("kernels").origin)  # the problem: our sources win
    before = sys.path[:]
    hub_kernels.prefer_installed_kernels()
    assert sys.path == before
    module = sys.modules["kernels"]
    assert not _is_shadow(module.__file__)


def test_without_the_distribution_nothing_is_imported_and_sys_path_is_kept(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    # Only the checkout root (holding our kernels/ sources) and an empty directory on the path.
    monkeypatch.setattr(sys, "path", [str(hub_kernels.SOURCE_ROOT), str(tmp_path)])
    hub_kernels.prefer_installed_kernels()
    assert "kernels" not in sys.modules
    assert sys.path == [str(hub_kernels.SOURCE_ROOT), str(tmp_path)]


def test_a_kernels_module_already_imported_is_left_alone(monkeypatch):
    marker = type(sys)("kernels")
    monkeypatch.setitem(sys.modules, "kernels", marker)
    hub_kernels.prefer_installed_kernels()
    assert sys.modules["kernels"] is marker
