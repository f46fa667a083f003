"""The toolchain: where nvcc, NVSHMEM, TVM-FFI and CUTLASS are, and the one set of compile flags the
build uses and the manifest records.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


class BuildError(Exception):
    pass


# Code-generation flags, recorded in every op's manifest. The build adds only include paths,
# dependency files and position-independent, hidden-visibility host code to them.
KERNEL_FLAGS = ("-O3", "-std=c++17", "-rdc=true")  # the op's kernels: separate compilation, NVSHMEM device link
# The fused GEMMs are whole-program (no -rdc: separate compilation keeps ptxas from inlining across
# the scheduler and serialises wgmma; CUTLASS's asserts are calls, which serialise it too).
GEMM_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", "-DTILEGEN_NO_NVSHMEM")
BINDING_FLAGS = ("-O2", "-std=c++17")  # the TVM-FFI binding, host C++
HOST_CODE = ("-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden")
# Reproducible objects: no randomness in the host compiler's symbol names and no build id. (Absolute
# paths are mapped away per package by the build: reproducible_flags.) What nvcc still varies from
# one build to the next is its temporary file names (tmpxft_<pid>_...) embedded in the host stub
# and in the fatbinary's module id: see docs/design.md.
REPRODUCIBLE = ("-Xcompiler", "-frandom-seed=tilegen")
LINK_REPRODUCIBLE = ("-Xlinker", "--build-id=none")


def reproducible_flags(*roots: str) -> tuple[str, ...]:
    """Host-compiler flags that write these folders' absolute paths as relative ones (__FILE__ in
    error messages, debug info), so that the same sources build alike in any folder."""
    return REPRODUCIBLE + tuple(f for r in roots for f in ("-Xcompiler", f"-ffile-prefix-map={r.rstrip('/')}/="))


# The GPU architectures a spec, `generate --archs` and a project's archs may name (NVSHMEM: sm_70+).
ARCH_PATTERN = r"sm_(7[05]|8[069]|9[0]a?|10[0-3]a?|12[01]a?)"


def gemm_arch(arch: str) -> str:
    """The fused GEMM uses wgmma/TMA: Hopper's arch-specific target (sm_90a)."""
    return arch if arch.endswith("a") else arch + "a"


def nvcc_arch_flags(arch: str) -> list[str]:
    num = re.sub(r"^sm_", "", arch)
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


def kernel_flags(arch: str) -> list[str]:
    return list(KERNEL_FLAGS) + nvcc_arch_flags(arch)


def gemm_flags(arch: str) -> list[str]:
    return list(GEMM_FLAGS) + nvcc_arch_flags(gemm_arch(arch))


@dataclass(frozen=True)
class Toolchain:
    nvcc: str
    nvcc_version: str
    nvshmem_dir: str
    nvshmem_version: str
    tvm_ffi_version: str
    cutlass_dir: str | None = None  # nvidia-cutlass's headers (fused GEMM ops)
    cutlass_version: str | None = None
    cublas_include: str | None = None  # nvidia-cublas's headers (the copy-engine overlap's GEMMs)
    cublas_version: str | None = None


def cutlass_headers() -> tuple[str | None, str | None]:
    """(include root of CUTLASS/CuTe from the nvidia-cutlass package, its version), or (None, None)."""
    try:
        import cutlass_library
        from importlib.metadata import version
    except ImportError:
        return None, None
    root = Path(cutlass_library.__file__).resolve().parent / "source"
    if not (root / "include/cutlass/cutlass.h").exists():
        return None, None
    try:
        ver = version("nvidia-cutlass")
    except Exception:
        ver = "unknown"
    return str(root), ver


def cublas_headers() -> tuple[str | None, str | None]:
    """(include dir with cublasLt.h from the nvidia-cublas package or the CUDA toolkit, its version),
    or (None, None). The libraries only include the header: cuBLASLt is opened at run time."""
    dirs = []
    try:
        import nvidia.cu13
        dirs += [str(Path(p) / "include") for p in nvidia.cu13.__path__]
    except ImportError:
        pass
    if os.environ.get("CUDA_HOME"):
        dirs.append(os.path.join(os.environ["CUDA_HOME"], "include"))
    for d in dirs:
        try:
            text = (Path(d) / "cublas_api.h").read_text()
        except OSError:
            continue
        parts = [re.search(rf"#define CUBLAS_VER_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
        if (Path(d) / "cublasLt.h").exists():
            return d, ".".join(p.group(1) for p in parts) if all(parts) else "unknown"
    return None, None


def nvshmem_dir() -> str:
    try:
        import nvidia.nvshmem as m
    except ImportError as e:
        raise BuildError("NVSHMEM not found: pip install nvidia-nvshmem-cu13 (a tilegen dependency)") from e
    return list(m.__path__)[0]


def nvshmem_header_version(root: str | None = None) -> str | None:
    try:
        text = (Path(root or nvshmem_dir()) / "include/non_abi/nvshmem_version.h").read_text()
    except (OSError, BuildError):
        return None
    parts = [re.search(rf"#define NVSHMEM_VENDOR_{k}_VERSION (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) for p in parts) if all(parts) else None


@lru_cache(maxsize=1)
def find_toolchain() -> Toolchain:
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    if not nvcc or not os.path.exists(nvcc):
        raise BuildError("nvcc not found on PATH (set CUDA_HOME or add the CUDA toolkit's bin/ to PATH)")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    nv = nvshmem_dir()
    cutlass_dir, cutlass_version = cutlass_headers()
    cublas_include, cublas_version = cublas_headers()
    if not cublas_include:
        raise BuildError("cuBLAS headers (cublasLt.h) not found: pip install nvidia-cublas (a tilegen dependency)")
    return Toolchain(
        nvcc,
        m.group(1) if m else "unknown",
        nv,
        nvshmem_header_version(nv) or "unknown",
        tvm_ffi_version(),
        cutlass_dir,
        cutlass_version,
        cublas_include,
        cublas_version,
    )


def tvm_ffi_version() -> str:
    """apache-tvm-ffi's version, from its metadata (importing it takes ~0.2 s: a no-op generate needs
    only the version, which the build key holds)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("apache-tvm-ffi")
    except PackageNotFoundError:
        raise BuildError("TVM-FFI not found: pip install apache-tvm-ffi (a tilegen dependency)") from None


@lru_cache(maxsize=1)
def tvm_ffi_paths() -> tuple[list[str], str]:
    """(include folders, library folder) of TVM-FFI, which the bindings compile and link against."""
    import tvm_ffi.libinfo as li
    return sorted({li.find_include_path(), li.find_dlpack_include_path()}), str(Path(li.find_libtvm_ffi()).parent)


def ninja_bin() -> str:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("ninja")
    if not path:
        raise BuildError("ninja not found: pip install ninja (a tilegen dependency)")
    return path
