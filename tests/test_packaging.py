"""The folder layout maps onto one package: kvpager.runtime etc. import from anywhere, and no
top-level `runtime` / `kernels` / `examples` module leaks out of the install (another distribution
may own such a name: transformers >= 5.25 installs Hugging Face's `kernels`; it must not be ours)."""
import subprocess
import sys

PROBE = """
import importlib, importlib.util, pathlib
import kvpager
root = pathlib.Path(kvpager.__file__).resolve().parent.parent  # the source checkout (editable install)
for top in ("runtime", "kernels", "examples"):
    spec = importlib.util.find_spec(top)
    assert spec is None or pathlib.Path(spec.origin or "").resolve().parent != root / top, top
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

    for name in ("CacheConfig", "PagePool", "BlockAllocator", "Sequence", "BlockTables",
                 "get_mla_metadata", "flash_mla_with_kvcache", "KVPagerError"):
        assert hasattr(kvpager, name), name


def test_runtime_imports_only_the_public_surface():
    """kvpager.runtime uses what kvpager exports plus its documented modules (kvpager.errors, the
    config checks of kvpager.validation, the CLI flag types of kvpager.cli_args), nothing deeper."""
    import pathlib
    import re

    runtime = pathlib.Path(__file__).resolve().parents[1] / "runtime"
    for path in runtime.rglob("*.py"):
        for module in re.findall(r"^\s*(?:from|import) (kvpager[\w.]*)", path.read_text(), re.M):
            assert module in ("kvpager", "kvpager.errors", "kvpager.validation", "kvpager.cli_args") or module.startswith(
                "kvpager.runtime"), f"{path.name} imports {module}"


def test_block_table_rows_are_built_where_a_compiler_is():
    """pip builds kvpager._block_table as an optional extension: a missing compiler falls back
    quietly to the Python path, so guard against a silent fallback where one exists."""
    import shutil

    from kvpager import block_table

    if shutil.which("c++") or shutil.which("g++"):
        assert block_table.NATIVE_AVAILABLE, "kvpager._block_table failed to build; see pip -v"
