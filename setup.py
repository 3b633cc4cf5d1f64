"""Build script: the Python packages always; the Hopper CUDA extension when it can be built.

KVPAGER_BUILD_CUDA=1 forces the extension (fails loudly if it cannot be built),
KVPAGER_BUILD_CUDA=0 skips it; unset, it is built when torch is a CUDA build and nvcc is found.
KVPAGER_DEBUG=1 builds with device-side asserts and line info; KVPAGER_NVCC_EXTRA adds nvcc flags.
The small C++ module behind BlockTables (kvpager._block_table) is built everywhere a C++ compiler
is found; it is optional (a failed build leaves the pure-Python path, same results).
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

PACKAGES = [
    "kvpager",
    "kvpager.kernels",
    "kvpager.runtime",
    "kvpager.runtime.models",
    "kvpager.examples",
    "kvpager.examples.deepseek",
    "kvpager.examples.server",
    "kvpager.benchmarks",
]
PACKAGE_DIR = {
    "kvpager": "kvpager",
    "kvpager.kernels": "kernels",
    "kvpager.runtime": "runtime",
    "kvpager.runtime.models": "runtime/models",
    "kvpager.examples": "examples",
    "kvpager.examples.deepseek": "examples/deepseek",
    "kvpager.examples.server": "examples/server",
    "kvpager.benchmarks": "benchmarks",
}


def _say(msg: str) -> None:
    print(f"kvpager setup: {msg}", file=sys.stderr)


def _cuda_build_reason():
    """Return (build: bool, reason: str)."""
    forced = os.environ.get("KVPAGER_BUILD_CUDA")
    if forced == "0":
        return False, "KVPAGER_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        torch = None
        why = f"torch cannot be imported ({exc}); install torch first, then use --no-build-isolation"
    if torch is None:
        pass
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        why = "nvcc / CUDA_HOME not found"
    elif importlib.util.find_spec("cutlass_library") is None:
        why = "the nvidia-cutlass package (CuTe headers) is not installed"
    else:
        return True, "CUDA torch, nvcc and CUTLASS headers found"
    if forced == "1":
        raise RuntimeError(f"KVPAGER_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
    return False, why


def _cuda_extension():
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    cutlass_root = importlib.util.find_spec("cutlass_library").submodule_search_locations[0]
    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [
        os.path.join(here, "kernels", "csrc"),
        os.path.join(cutlass_root, "source", "include"),
        os.path.join(cutlass_root, "source", "tools", "util", "include"),
        # CUDA 13 moved CCCL (cuda/std, cub) here; host TUs that see CUTLASS need it too.
        os.path.join(CUDA_HOME, "include", "cccl"),
    ]
    debug = os.environ.get("KVPAGER_DEBUG") == "1"
    nvcc = [
        "-O3",
        "-std=c++17",
        "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        "-lineinfo",
        "--ptxas-options=-v,--warn-on-spills",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + (["-DKVPAGER_DEBUG=1", "-G"] if debug else ["-DNDEBUG"])
    nvcc += os.environ.get("KVPAGER_NVCC_EXTRA", "").split()  # e.g. -DKVPAGER_TRACE (seesaw timeline)
    sources = sorted(glob.glob("kernels/csrc/*.cu")) + ["kernels/csrc/bindings.cpp"]
    return CUDAExtension(
        name="kvpager.kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc},
    )


def _block_table_extension():
    """kvpager._block_table: plain C++ against the pybind11 headers torch ships (no libtorch)."""
    from setuptools import Extension

    try:
        import torch
    except ImportError:
        _say("skipping the C++ block-table rows (torch, whose pybind11 headers they use, is not "
             "installed); BlockTables will use its Python path.")
        return []
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    return [Extension(
        "kvpager._block_table",
        sources=["kvpager/csrc/block_table.cpp"],
        include_dirs=[include],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
        optional=True,  # no compiler: a warning, and the Python path
    )]


def _build_options():
    ext_modules = _block_table_extension()
    build, reason = _cuda_build_reason()
    if not build:
        _say(f"skipping the CUDA kernel extension ({reason}); kvpager will use the PyTorch reference MLA.")
        return {"ext_modules": ext_modules} if ext_modules else {}
    _say(f"building the CUDA kernel extension ({reason}).")
    from torch.utils.cpp_extension import BuildExtension

    return {
        "ext_modules": ext_modules + [_cuda_extension()],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_build_options())
