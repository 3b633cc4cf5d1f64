"""The folder layout maps onto one package: kvpager.runtime etc. import from anywhere, and no
top-level `runtime` / `kernels` / `examples` module leaks out of the install."""
import subprocess
import sys

PROBE = """
import importlib, importlib.util
for top in ("runtime", "kernels", "examples"):
    assert importlib.util.find_spec(top) is None, top
import kvpager.runtime, kvpager.runtime.models, kvpager.kernels, kvpager.examples
import kvpager.kernels.schedule
print("ok")
"""


def test_subpackages_import_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_surface():
    import kvpager

    for name in ("CacheConfig", "PagePool", "BlockAllocator", "Sequence", "BatchTables",
                 "get_mla_metadata", "flash_mla_with_kvcache", "KVPagerError"):
        assert hasattr(kvpager, name), name


def test_readme_usage_example_runs():
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 1, 16, 512)
    assert scope["cache_seqlens"].tolist() == [100, 101]


def test_row_events_are_built_where_a_compiler_is():
    """pip builds kvpager._row_events as an optional extension: a missing compiler falls back
    quietly to the Python path, so guard against a silent fallback where one exists."""
    import shutil

    from kvpager import table_events

    if shutil.which("c++") or shutil.which("g++"):
        assert table_events.NATIVE_AVAILABLE, "kvpager._row_events failed to build; see pip -v"
