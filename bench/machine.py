"""The device machine a phase runs on: its GPUs, the environment every step runs in, the Python
packages and op libraries the steps import, and CUDA MPS when ranks share GPUs."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .config import option

# Multicast (NVLS) can take the shared host's GPUs down: never on there.
NEVER_MULTICAST = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SITE = Path("/tmp/site")  # where the carried wheels are installed (the device machine's Python lacks them)
MPS_DIRS = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps-pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/mps-log"}


def count_gpus() -> int:
    """GPUs nvidia-smi lists (0 when it is missing)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    """Flags every phase takes."""
    out: str = option(os.environ.get("OUT", "/tmp/tilegen-out"), "folder for logs and results")
    symmetric_size: str = option("24G", "NVSHMEM_SYMMETRIC_SIZE per rank (4 ranks on one GPU: 12G)")
    gemm_sms: int | None = option(None, "TILEGEN_GEMM_SMS for the fused GEMMs (default: this rank's share of "
                                        "the SMs less 16 when ranks share a GPU)")
    prebuilt: str = option(".prebuilt/ops.tar.xz", "op libraries built on the CPU machine (tools/pack_prebuilt.sh); "
                                                   "absent: every spec is generated and built here")


class Machine:
    """One phase's view of the device machine. `env` is what every step runs with; `shared` says ranks
    share GPUs (MPS: protocol checks, never timings)."""

    def __init__(self, ranks: int, gpus: int, cfg: MachineConfig):
        self.ranks, self.gpus, self.cfg = ranks, gpus, cfg
        self.out = Path(cfg.out)
        self.env = dict(os.environ, **NEVER_MULTICAST)
        # Spinning kernels and lazily loaded kernels can deadlock (a load may wait for the spinning kernel):
        self.env.setdefault("CUDA_MODULE_LOADING", "EAGER")
        self.env.update(NVSHMEM_SYMMETRIC_SIZE=cfg.symmetric_size, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo",
                        PYTHONUNBUFFERED="1", TVM_FFI_DISABLE_TORCH_C_DLPACK="1", OUT=str(self.out))
        if cfg.gemm_sms is not None:
            self.env["TILEGEN_GEMM_SMS"] = str(cfg.gemm_sms)
        self._python_ready = self._ops_ready = False
        self._mps_depth = 0

    @property
    def shared(self) -> bool:
        """More ranks than GPUs (no GPUs: nothing to share; the steps find none)."""
        return 0 < self.gpus < self.ranks

    def with_ranks(self, ranks: int) -> "Machine":
        """The same machine (packages, ops) for a step at another rank count."""
        m = Machine(ranks, self.gpus, self.cfg)
        m.env, m._python_ready, m._ops_ready = dict(self.env), self._python_ready, self._ops_ready
        return m

    def setup_python(self) -> None:
        """Install the carried wheels (.whl/) for the steps and for this process."""
        if self._python_ready:
            return
        self._python_ready = True
        wheels = sorted(glob.glob(".whl/*.whl"))
        paths = [os.getcwd()]
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--upgrade", "--target", str(SITE), *wheels], check=True)
            paths.insert(0, str(SITE))
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        for p in reversed(paths):
            if p not in sys.path:
                sys.path.insert(0, p)
        importlib.invalidate_caches()

    def make_ops(self) -> bool:
        """The op libraries: unpacked from the prebuilt tarball (which must find NVSHMEM and TVM-FFI here),
        else generated and built from specs/."""
        if self._ops_ready:
            return True
        self.setup_python()
        self._ops_ready = True
        tarball = Path(self.cfg.prebuilt)
        if tarball.is_file():
            with tarfile.open(tarball) as t:
                names = t.getnames()
                t.extractall(".", filter="data") if hasattr(tarfile, "data_filter") else t.extractall(".")
            libs = [self._package_dir("nvidia.nvshmem") / "lib", self._package_dir("tvm_ffi") / "lib"]
            self.env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [*map(str, libs), *filter(None, [self.env.get("LD_LIBRARY_PATH")])])
            print(f"ops: prebuilt ({sum(n.endswith('.so') for n in names)} libraries)", flush=True)
            return True
        log = self.out / "generate.log"
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "tilegen.cli", "generate", "specs/", "-o", "generated",
                                 "-j", "32", "-q"], env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            print(tail(log, 30), "generate failed", sep="\n", flush=True)
        return rc == 0

    def provenance(self, command: str) -> dict:
        """Where this phase's figures come from, as docs/data/runs.json records it: the date (UTC), the commit
        the carried ops were packed from (none when the tree differed from it, or nothing says), the cards,
        driver, torch and NCCL, and the command."""
        rev = Path(self.cfg.prebuilt).with_name("ops.rev")
        packed = rev.read_text().strip() if rev.is_file() else ""
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else ""
        gpus = [[c.strip() for c in line.split(",")] for line in smi.splitlines() if "," in line]
        names, drivers = sorted({g[0] for g in gpus}), sorted({g[1] for g in gpus})
        versions = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__); "
                                   "print('.'.join(map(str, torch.cuda.nccl.version())))"],
                                  env=self.env, capture_output=True, text=True).stdout.split()
        return {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                "commit": packed[:7] if re.fullmatch(r"[0-9a-f]{40}", packed) else None,
                "cards": f"{len(gpus)} x {names[0]}" if len(names) == 1 else (", ".join(names) or None),
                "driver": drivers[0] if len(drivers) == 1 else None,
                "torch": versions[0] if len(versions) == 2 else None,
                "nccl": versions[1] if len(versions) == 2 else None, "command": command}

    @staticmethod
    def _package_dir(name: str) -> Path:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise SystemExit(f"{name} is not installed here: carry its wheel in .whl/")
        return Path(list(spec.submodule_search_locations)[0])

    @contextlib.contextmanager
    def sharing_gpus(self):
        """CUDA MPS while more ranks than GPUs run (NVSHMEM's multi-process-per-GPU mode); nested uses
        share one daemon."""
        if not self.shared or self._mps_depth:
            self._mps_depth += 1
            try:
                yield
            finally:
                self._mps_depth -= 1
            return
        pct = 100 // (self.ranks // self.gpus)
        self.env.update(MPS_DIRS, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(pct),
                        NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="1")
        for d in MPS_DIRS.values():
            os.makedirs(d, exist_ok=True)
        started = shutil.which("nvidia-cuda-mps-control") is not None and \
            subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env).returncode == 0
        print(f"MPS started: {self.ranks} ranks on {self.gpus} GPU(s)" if started
              else "MPS not started: ranks time-slice", flush=True)
        if "TILEGEN_GEMM_SMS" not in self.env:
            # A fused GEMM and its communication kernel spin on each other, so both must be resident: size
            # the persistent GEMM to this rank's share of the SMs, less a margin (MPS does not promise it all).
            sms = self._sm_count()
            if sms:
                self.env["TILEGEN_GEMM_SMS"] = str(sms * pct // 100 - 16)
        self._mps_depth = 1
        try:
            yield
        finally:
            self._mps_depth = 0
            if started:
                subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env)

    def _sm_count(self) -> int:
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_properties(0)"
                            ".multi_processor_count)"], env=self.env, capture_output=True, text=True)
        return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip().isdigit() else 0


def tail(path: Path, n: int) -> str:
    """The file's last n lines (none for n <= 0)."""
    if n <= 0:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"({path} was not written)"
