"""Build ngcuda._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  NGCUDA_CUDA=0|1         force the CUDA kernels off or on (on fails loudly if they cannot build)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0" (nvcc 13 builds sm_75 and newer)
  MAX_JOBS                parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).parent.resolve()


def _default_cuda_home() -> None:
    # A wrapper script on PATH can hide the toolkit root from torch's guess; prefer a real toolkit.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ("/usr/local/cuda", "/opt/cuda"):
        if Path(root, "bin", "nvcc").exists():
            os.environ["CUDA_HOME"] = root
            return


_default_cuda_home()

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

DEFAULT_ARCHS = "8.0;9.0"


def want_cuda() -> bool:
    forced = os.environ.get("NGCUDA_CUDA")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced not in (None, "", "0", "1"):
        sys.exit(f"NGCUDA_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1" and not available:
        sys.exit(
            "NGCUDA_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}. "
            "Install a CUDA build of torch and put nvcc on PATH (or set CUDA_HOME)."
        )
    if forced == "0":
        return False
    return available


def nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of the cuBLAS/cuSOLVER/cuSPARSE that torch's wheels ship."""
    includes: list[str] = []
    libs: list[str] = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return includes, libs
    for base in nvidia.__path__:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if glob.glob(os.path.join(inc, "cusolverDn.h")) or glob.glob(os.path.join(inc, "cublas_v2.h")):
                includes.append(inc)
        for lib in sorted(glob.glob(os.path.join(base, "*", "lib"))):
            if glob.glob(os.path.join(lib, "libcusolver.so*")) or glob.glob(os.path.join(lib, "libcublas.so*")):
                libs.append(lib)
    return includes, libs


def versioned_link_flags(lib_dirs: list[str], names: list[str]) -> list[str]:
    """`-l:libX.so.N` for each library: the wheels ship only versioned files."""
    flags: list[str] = []
    for name in names:
        found = None
        for d in lib_dirs:
            hits = sorted(glob.glob(os.path.join(d, f"lib{name}.so.*")), key=len)
            if hits:
                found = os.path.basename(hits[0])
                break
        flags.append(f"-l:{found}" if found else f"-l{name}")
    return flags


def nvcc_version() -> tuple[int, int] | None:
    import re
    import subprocess

    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_archs(archs: str) -> None:
    """Fails before any compile, naming the entry, where nvcc would fail minutes into the build."""
    version = nvcc_version()
    if version is None or version < (13, 0):
        return
    too_old = []
    for entry in archs.replace(";", " ").split():
        number = entry.split("+")[0].rstrip("afAF")
        try:
            if float(number) < 7.5:
                too_old.append(entry)
        except ValueError:
            continue  # a named architecture ("Ampere"): torch resolves it
    if too_old:
        sys.exit(
            f"TORCH_CUDA_ARCH_LIST={archs!r}: nvcc {version[0]}.{version[1]} builds sm_75 and newer only, "
            f"not {', '.join(too_old)}. Drop them (the default is {DEFAULT_ARCHS!r}), or build the CPU "
            "kernels only with NGCUDA_CUDA=0."
        )


def extension():
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cpu_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cpu_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "meta").glob("*.cpp"))
    torch_version = torch.__version__.split("+")[0]
    cxx = ["-O3", f'-DNGCUDA_TORCH_VERSION="{torch.__version__}"']
    if sys.platform != "darwin":
        cxx.append("-fopenmp")
    define_macros: list[tuple[str, str | None]] = []
    link_args: list[str] = ["-fopenmp"] if sys.platform != "darwin" else []
    if not want_cuda():
        return cpp_extension.CppExtension(
            "ngcuda._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link_args
        )

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    check_archs(archs)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    cuda_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
    includes, lib_dirs = nvidia_wheel_dirs()
    define_macros.append(("NGCUDA_WITH_CUDA", None))
    cxx += [f'-DNGCUDA_CUDA_ARCHS="{archs}"', f'-DNGCUDA_CUDA_VERSION="{torch.version.cuda}"']
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    link_args += versioned_link_flags(lib_dirs, ["cusolver", "cublas"])
    link_args += [f"-Wl,-rpath,{d}" for d in lib_dirs]
    del torch_version
    return cpp_extension.CUDAExtension(
        "ngcuda._C",
        cpu_sources + cuda_sources,
        include_dirs=[str(ROOT / "csrc")] + includes,
        library_dirs=lib_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link_args,
    )


setup(
    name="ngcuda",
    version="0.1.0",
    description="K-FAC natural-gradient optimizer for graph neural networks, with C++/CUDA kernels",
    packages=find_packages(include=["ngcuda", "ngcuda.*"]),
    package_data={"ngcuda": ["data/files/**/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis", "torch-geometric"], "pyg": ["torch-geometric"]},
    entry_points={"console_scripts": ["ngcuda=ngcuda.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    zip_safe=False,
)
