"""Stage 6: runtime.

Initialises NVSHMEM through nvshmem4py (unique id broadcast over torch.distributed; torchrun is
the launcher), hands out symmetric tensors, and loads pre-generated ops after checking that they
were built for this NVSHMEM, this GPU architecture and this tilegen.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .. import __version__, settings
from .group import Group, Registry, _is_process_group, agree, describe, handle

_state: dict[str, Any] = {"initialised": False, "ops": [], "rank": None, "world": None, "groups": None}


class OpLoadError(RuntimeError):
    """A generated op cannot be used here (not built, or built for another toolchain/GPU)."""


def _torch() -> Any:
    import torch
    return torch


def init(device: int | None = None, backend: str | None = None) -> tuple[int, int]:
    """Initialise NVSHMEM on every rank (collective). Returns (rank, world).

    Uses torch.distributed for the unique-id broadcast; initialises the default process group from
    torchrun's environment if the app has not (NCCL when every local rank has its own GPU, else
    gloo: several ranks per GPU are NVSHMEM's multi-process-per-GPU mode, best under CUDA MPS).
    The CUDA device is LOCAL_RANK modulo the visible devices unless given.
    """
    if _state["initialised"]:
        return _state["rank"], _state["world"]
    torch = _torch()
    import torch.distributed as dist
    from cuda.core import Device
    import nvshmem.core as nvshmem

    if not torch.cuda.is_available():
        raise RuntimeError("tilegen.init: no CUDA device is visible")
    ndev = torch.cuda.device_count()
    if not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        dist.init_process_group(backend=backend or ("nccl" if local_world <= ndev else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = device if device is not None else int(os.environ.get("LOCAL_RANK", rank)) % ndev
    torch.cuda.set_device(local)
    dev = Device(local)
    dev.set_current()
    uid = nvshmem.get_unique_id(empty=(rank != 0))
    box = [uid if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    nvshmem.init(device=dev, uid=box[0], rank=rank, nranks=world, initializer_method="uid")
    _state.update(initialised=True, rank=rank, world=world, device=local, groups=Registry(world))
    return rank, world


def is_initialized() -> bool:
    return bool(_state["initialised"])


def world_size() -> int:
    _require_init("world_size")
    return _state["world"]


def rank() -> int:
    _require_init("rank")
    return _state["rank"]


def group(ranks: Any = None) -> Group | None:
    """A group of ranks that ops run on (their group= argument). Collective over the world, as
    torch.distributed.new_group: every rank calls it, passing the same list of ranks (every rank gets
    the Group; a rank outside it can hold it but not call ops on it), the same list of disjoint rank
    lists ([[0, 1], [2, 3]]: each rank gets its own), or its own torch ProcessGroup (ranks in none
    pass None and get None). Every loaded op sets up the group's buffers now, later ones when loaded."""
    _require_init("group")
    import torch.distributed as dist

    me, world, registry = _state["rank"], _state["world"], _state["groups"]
    mine = describe(ranks, world, me)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, _is_process_group(ranks)))
    groups = agree([g[0] for g in gathered], [g[1] for g in gathered])
    slot, how = registry.add(groups)
    # a new slot is allocated by every rank (NVSHMEM: collective); joining one only concerns the new
    # groups' members, whose peers must not call before every member set up: a barrier ends it
    if how == "new" or (how == "joined" and any(me in g for g in groups)):
        for op in _state["ops"]:
            op._init_slot(slot)
    if how == "joined":
        dist.barrier()
    made = handle(groups, slot, me)
    if made is None and len(groups) == 1 and ranks is not None:
        return Group(groups[0], slot, -1)  # a list of ranks this rank is not in (torch's non-member)
    return made


def world_group() -> Group:
    """The world as a Group (what ops use when given no group)."""
    _require_init("world_group")
    return Group(tuple(range(_state["world"])), 0, _state["rank"])


def _require_init(what: str) -> None:
    if not _state["initialised"]:
        raise RuntimeError(f"tilegen.{what}: call tilegen.init() first (on every rank)")


def empty(shape: Sequence[int], dtype: Any) -> Any:
    """A torch tensor on the NVSHMEM symmetric heap (collective: same shape on every rank)."""
    _require_init("empty")
    import nvshmem.core as nvshmem
    torch = _torch()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return nvshmem.tensor(tuple(int(s) for s in shape), dtype=dtype)


def free(tensor: Any) -> None:
    import nvshmem.core as nvshmem
    nvshmem.free_tensor(tensor)


def finalize() -> None:
    """Release every loaded op's symmetric state, then NVSHMEM (collective)."""
    if not _state["initialised"]:
        return
    torch = _torch()
    torch.cuda.synchronize()
    for op in _state["ops"]:
        op.release()
    for op in _state["ops"]:
        op.free_outputs()
    import nvshmem.core as nvshmem
    nvshmem.finalize()
    _state.update(initialised=False, ops=[])


def _register_errors() -> None:
    import tvm_ffi.error as e
    try:
        e.register_error("TimeoutError", TimeoutError)
    except Exception:  # already registered
        pass


def _arch_of_current_device() -> str:
    torch = _torch()
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def check_build(directory: Path, name: str, runtime_nvshmem: str | None, device_arch: str | None) -> Path:
    """Validate an op's build.json against this process; returns the library path."""
    rebuild = f"rebuild it with: tilegen generate <specs> -o {directory.parent}"
    bj = directory / "_build" / "build.json"
    if not bj.exists():
        raise OpLoadError(f"op {name} is not built here ({bj} is missing); {rebuild}")
    info = json.loads(bj.read_text())
    man = json.loads((directory / "manifest.json").read_text())
    if info.get("spec_hash") != man.get("spec_hash"):
        raise OpLoadError(f"op {name}: the library was built from another version of its spec; {rebuild}")
    if info.get("tilegen_version") != __version__:
        raise OpLoadError(f"op {name} was built by tilegen {info.get('tilegen_version')}, this is tilegen "
                          f"{__version__}; {rebuild}")
    if runtime_nvshmem is not None and info.get("nvshmem") != runtime_nvshmem:
        raise OpLoadError(
            f"op {name} was built against NVSHMEM {info.get('nvshmem')} (its device code is linked in), but this "
            f"process runs NVSHMEM {runtime_nvshmem}; install a build for NVSHMEM {runtime_nvshmem} or {rebuild}"
        )
    if device_arch is not None:
        built = info.get("archs") or [info.get("arch", "")]
        if device_arch not in {a.rstrip("a") for a in built}:
            raise OpLoadError(
                f"op {name} holds GPU code for {', '.join(built)} only, but this GPU is {device_arch}; set arch: "
                f"{device_arch} in its spec (or generate --archs ...,{device_arch}) and {rebuild}"
            )
    lib = directory / "_build" / info["library"]
    if not lib.exists():
        raise OpLoadError(f"op {name}: {lib} is missing; {rebuild}")
    return lib


def _preload_shared_libraries() -> None:
    """Load NVSHMEM's host library and TVM-FFI's from their Python packages (global symbols), so that
    an op library finds them by name wherever it was built (a wheel's rpath points at the build
    machine's site-packages; no LD_LIBRARY_PATH needed)."""
    if _state.get("preloaded"):
        return
    import ctypes

    import tvm_ffi.libinfo
    from .toolchain import nvshmem_dir

    for path in (Path(nvshmem_dir()) / "lib" / "libnvshmem_host.so.3", Path(tvm_ffi.libinfo.find_libtvm_ffi())):
        if path.exists():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _state["preloaded"] = True


class GeneratedOp:
    """A pre-generated, pre-built op: loading (provenance checked), release, wait bounds. Each family's
    runtime class (tilegen.<family>.runtime) adds the call."""

    def __init__(
        self,
        directory: Path,
        name: str,
        kind: str,
        dtype: str,
        shape: list,
        world_sizes: list[int],
        symmetric_output: bool = True,
        default_timeout_ms: float = 0,
    ):
        self.directory = Path(directory)
        self.name = name
        self.kind = kind
        self.dtype = dtype
        self.shape = shape
        self.world_sizes = world_sizes
        self.symmetric_output = symmetric_output
        self.default_timeout_ms = default_timeout_ms
        self._mod = None
        self._run = None  # mod.run, looked up once (a module attribute is a function lookup per access)
        self._outputs: dict[tuple, Any] = {}
        self._torch_op = None  # the op as torch ops (each family's runtime makes it on first use)
        self._slot = 0  # the group slot the library's calls run on now
        self._world = self._rank = 0  # the current call's group size and this rank's place in it

    def __repr__(self) -> str:
        return f"<tilegen op {self.name}: {self.kind} {self.dtype} shape {self.shape} worlds {self.world_sizes}>"

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The inner dims (a free one: its max)."""
        return tuple(d["max"] if isinstance(d, dict) else d for d in self.shape[1:])

    @property
    def free_inner(self) -> tuple[bool, ...]:
        """Which inner dims a call may size (up to inner_shape)."""
        return tuple(isinstance(d, dict) for d in self.shape[1:])

    def load(self) -> Any:
        """Load the library (checks provenance first). Needs tilegen.init()."""
        if self._mod is not None:
            return self._mod
        _require_init(self.name)
        if _capturing(None):
            raise RuntimeError(
                f"{self.name}: loading an op allocates symmetric memory collectively, which a CUDA graph "
                f"cannot capture: call the op once before capturing it"
            )
        if _state["world"] not in self.world_sizes:  # before any collective call into the library
            raise OpLoadError(
                f"op {self.name} was generated for world sizes {self.world_sizes}, this job has "
                f"{_state['world']} ranks; add {_state['world']} to world_sizes in its spec and regenerate"
            )
        import nvshmem.core as nvshmem
        import tvm_ffi

        _register_errors()
        lib = check_build(
            self.directory, self.name, nvshmem.get_version().libnvshmem_version, _arch_of_current_device()
        )
        _preload_shared_libraries()
        mod = tvm_ffi.load_module(str(lib))
        compiled, runtime = (int(v) for v in mod.nvshmem_versions())
        if compiled != runtime:
            raise OpLoadError(
                f"op {self.name}: compiled against NVSHMEM {compiled // 10000}.{compiled // 100 % 100}."
                f"{compiled % 100} but linked to {runtime // 10000}.{runtime // 100 % 100}.{runtime % 100}; "
                f"rebuild it with: tilegen generate <specs> -o {self.directory.parent}"
            )
        self._configure(mod)
        world = int(mod.world())  # collective on first use: allocates the op's symmetric signals
        if world not in self.world_sizes:
            raise OpLoadError(f"op {self.name} supports world sizes {self.world_sizes}, this job has {world}")
        self._mod = mod
        self._run = getattr(mod, "run", None)  # MoE ops have their own entry points
        self._slot, self._world, self._rank = 0, _state["world"], _state["rank"]
        _state["ops"].append(self)
        for slot in range(1, len(_state["groups"].slots)):  # groups made before the op was loaded
            self._init_slot(slot)
        self._register_torch_ops()
        return mod

    def _register_torch_ops(self) -> None:
        """The op's torch ops, registered at load (before any torch.compile traces a call), where torch
        is installed: without it the op takes other DLPack tensors (CuPy, ...) as before."""
        try:
            import torch  # noqa: F401
        except ImportError:
            return
        self.torch  # noqa: B018

    def _configure(self, mod: Any) -> None:
        """Before the library's first init: the settings it takes from Python (tilegen.settings)."""

    @property
    def torch(self) -> Any:
        """The op as torch ops, which torch.compile traces (each family's _make_torch_op says which).
        Registered on first use, which must not be inside torch.compile's trace (registration is eager
        work): loading the op, or touching op.torch once, before compiling does it."""
        if self._torch_op is None:
            import torch

            if torch.compiler.is_compiling():
                raise RuntimeError(f"{self.name}: its torch ops are registered when it loads; load it "
                                   f"(ops.load(...)) or touch {self.name}.torch once before torch.compile traces "
                                   f"a call")
            self._torch_op = self._make_torch_op()
        return self._torch_op

    def _make_torch_op(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no torch ops")

    def _init_slot(self, slot: int) -> None:
        """Collective: sets up group slot `slot` in the library (this rank's group there, if the op
        supports its size; else only the slot's symmetric buffers)."""
        s = _state["groups"].slots[slot]
        mine = s.group_of(_state["rank"])
        self._mod.init_group(slot, s.alloc_world, list(mine) if len(mine) in self.world_sizes else [])
        self._slot = 0  # (init_group leaves the world's slot selected)

    def _use(self, group: Any) -> None:
        """The call's group (None: the world): checked, selected in the library, its size and this
        rank's place in it taken as _world / _rank. A ValueError before anything is launched."""
        if group is None:
            slot, self._world, self._rank = 0, _state["world"], _state["rank"]
        else:
            if not isinstance(group, Group):
                raise ValueError(f"{self.name}: group must be a tilegen group (tilegen.group(...)), got "
                                 f"{type(group).__name__}")
            if group.rank < 0:
                raise ValueError(f"{self.name}: group {list(group.ranks)} does not hold this rank "
                                 f"({_state['rank']}); only its members call ops on it")
            if group.size not in self.world_sizes:
                raise ValueError(f"{self.name}: group {list(group.ranks)} has {group.size} ranks; this op was "
                                 f"generated for world sizes {self.world_sizes}")
            slot, self._world, self._rank = group.slot, group.size, group.rank
        if slot != self._slot:
            self._mod.select(slot)
            self._slot = slot

    def release(self) -> None:
        if self._mod is not None:
            self._mod.release()
            self._mod = None
            self._run = None

    def max_rows(self) -> int:
        d0 = self.shape[0]
        return d0["max"] if isinstance(d0, dict) else d0

    def _timeout_ns(self, timeout_ms: float | None, handle: int | None = None) -> int:
        """The call's wait bound in ns: its timeout_ms, else TILEGEN_WAIT_TIMEOUT_MS, else the spec's
        wait_timeout_ms (0: unbounded). A bounded call synchronises the stream afterwards to read the
        wait report, which a CUDA graph cannot: captured on stream `handle`, the two defaults give way
        to an unbounded wait and an explicit timeout_ms > 0 is refused."""
        explicit = timeout_ms is not None
        if not explicit:
            timeout_ms = settings.get("TILEGEN_WAIT_TIMEOUT_MS")
            if timeout_ms is None:
                timeout_ms = self.default_timeout_ms
        if timeout_ms < 0:
            raise ValueError(f"{self.name}: timeout_ms must be >= 0, got {timeout_ms}")
        if timeout_ms > 0 and _capturing(handle):
            if not explicit:
                return 0
            raise RuntimeError(
                f"{self.name}: bounded waits (timeout_ms > 0) synchronise the stream after each call and "
                f"cannot be captured in a CUDA graph; capture with timeout_ms=0"
            )
        return int(timeout_ms * 1e6)

    def free_outputs(self) -> None:
        """Free the outputs empty_output cached (collective)."""
        for t in self._outputs.values():
            free(t)
        self._outputs.clear()

def _stream_handle(stream: Any) -> int:
    """The CUDA stream to launch on: explicit, else -1: the binding takes TVM-FFI's stream for the
    call, which TVM-FFI sets to the framework's current stream (torch's, through the DLPack exchange
    API) when the arguments are its tensors. No Python-side stream lookup per call."""
    if stream is None:
        return -1
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    raise ValueError(f"stream must be an int handle or a stream object, got {type(stream).__name__}")


def _capturing(handle: int | None) -> bool:
    """Whether the stream (None: torch's current stream) is being captured into a CUDA graph."""
    try:
        torch = _torch()
    except ImportError:
        torch = None
    if handle is None or handle < 0 or (torch is not None and handle == torch.cuda.current_stream().cuda_stream):
        return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    from cuda.bindings import runtime as rt

    err, status = rt.cudaStreamIsCapturing(handle)
    return status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone


def _synchronize(tensor: Any, handle: int) -> None:
    if type(tensor).__module__.startswith("torch"):
        torch = _torch()
        torch.cuda.ExternalStream(handle).synchronize() if handle > 0 else torch.cuda.synchronize()
        return
    from cuda.bindings import runtime as rt

    rt.cudaStreamSynchronize(handle if handle > 0 else 0)
