"""The collective family's rendering: its lowered plans (tilegen.collective.plan) as the traits,
step tables and binding constants of tilegen/include/tilegen/collective.cuh's kernel. It reads the
plans' sizes; it computes none (the plan is the one place the layout's rules are applied)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.render import DL_CODES, op_id
from ..core.spec import DTYPES, DynamicDim
from .ir import Schedule, Seg, Step
from .plan import OpFacts, Plan
from .spec import CollectiveSpec

REDUCE_CODE = {"sum": 0, "max": 1, "min": 2, "avg": 3, "premul_sum": 3}  # primitives/reduce.cuh's ReduceOp
SEG_NAMES = {"in": "In", "out": "Out", "scr": "Scr"}
CHUNKS = {"one": "Chunks::kOne", "per_rank": "Chunks::kPerRank", "split": "Chunks::kSplit"}
GEMM_CODE = {None: "Gemm::kNone", "consume": "Gemm::kConsume", "produce": "Gemm::kProduce"}
ALIAS_CODE = {"none": 0, "whole": 1, "own_chunk": 2}


def _mask(ranks) -> str:
    return f"0x{sum(1 << r for r in ranks):x}u"


def _segs(segs: tuple[Seg, ...]) -> str:
    return "{" + ", ".join(f"{SEG_NAMES[g.buf]}({g.rank}, {g.slot})" for g in segs) + "}"


def step_code(st: Step) -> str:
    """A step as the C++ expression that builds it (tilegen/collective/kernel.cuh's Step)."""
    if st.kind == "entry":
        return f"St::entry({_mask(st.notify)}, {_mask(st.await_ranks)})"
    if st.kind == "wait":
        return f"St::wait_for({st.unit}, {_segs(st.waits)})"
    scaled = sum(1 << i for i, k in enumerate(st.scaled) if k)
    tail = (f", {_segs(st.waits)}" if st.waits or scaled else "") + (f", 0x{scaled:x}" if scaled else "")
    return f"St::move({st.unit}, {_segs(st.srcs)}, {_segs(st.dests)}{tail})"


def step_comment(st: Step, rank: int, ll: bool = False) -> str:
    """What a step does, decoded: the comment beside it in the generated table."""
    if st.kind == "entry":
        return f"entry: tell {list(st.notify)}, await {list(st.await_ranks)}"
    waits = ", ".join(str(w) for w in st.waits)
    if st.kind == "wait":
        return f"wait {waits}"
    what = "put" if len(st.srcs) == 1 else "reduce"
    srcs = " + ".join(("s*" if k else "") + str(g) for g, k in zip(st.srcs, st.scaled or (False,) * len(st.srcs)))
    remote = sorted({d.rank for d in st.dests if d.rank != rank or st.signal_self})
    if ll:
        return (f"{what} unit {st.unit}: {srcs}{' (lines as their flags arrive)' if waits else ''}"
                f" -> {', '.join(str(d) for d in st.dests)}" + (f"; LL lines @{remote}" if remote else ""))
    return (f"{what} unit {st.unit}: {f'(after {waits}) ' if waits else ''}{srcs} -> "
            f"{', '.join(str(d) for d in st.dests)}" + (f"; signal @{remote}" if remote else ""))


def step_lines(s: Schedule) -> list[list[tuple[str, str]]]:
    """(code, comment) of every step, per rank."""
    return [[(step_code(st), step_comment(st, r, s.sync == "ll")) for st in steps] for r, steps in enumerate(s.ranks)]


@dataclass
class Totals:
    """The most any variant at any world needs: sizes of the traits' arrays and buffers."""

    max_steps: int = 1
    max_src: int = 1
    max_dst: int = 1
    max_wait: int = 1
    max_tiles: int = 1
    out_slots: int = 1
    scr_slots: int = 1
    in_slots: int = 1
    scr_bytes: int = 0
    stage_bytes: int = 16
    max_ctas: int = 1
    out_symmetric: bool = False
    ll_slots: int = 0  # LL scratch: two parity halves of ll_slots slots (include/tilegen/collective.cuh's ll_addr)
    ll_slot_bytes: int = 0

    @property
    def ll_bytes(self) -> int:
        return 2 * self.ll_slots * self.ll_slot_bytes


def totals(spec: CollectiveSpec, plans: list[Plan]) -> Totals:
    """The most any variant at any world needs, from the plans' lowered sizes."""
    t = Totals()
    for p in plans:
        for v in p.variants:
            s = v.schedule
            t.max_steps = max(t.max_steps, s.max_steps)
            for steps in s.ranks:
                for st in steps:
                    t.max_src, t.max_dst = max(t.max_src, len(st.srcs)), max(t.max_dst, len(st.dests))
                    t.max_wait = max(t.max_wait, len(st.waits))
            if s.sync == "ll":  # its own scratch; no signal flags, no staging, nothing stored into peers' outputs
                t.ll_slots = max(t.ll_slots, s.slots("scr"))
                t.ll_slot_bytes = max(t.ll_slot_bytes, v.ll_slot_bytes)
                continue
            t.scr_bytes = max(t.scr_bytes, -(-s.slots("scr") // s.parts) * v.shard)
            t.scr_slots = max(t.scr_slots, s.slots("scr"))
            t.out_slots = max(t.out_slots, v.out_slots)
            t.in_slots = max(t.in_slots, v.in_slots)
            t.max_ctas = max(t.max_ctas, v.ctas)
            t.max_tiles = max(t.max_tiles, v.max_tiles)
            if p.op.reduces and spec.transport != "nvlink":
                t.stage_bytes = max(t.stage_bytes, v.tile_bytes)
            for r, steps in enumerate(s.ranks):
                for st in steps:
                    t.out_symmetric |= any(d.buf == "out" and d.rank != r for d in st.dests)
    return t


def cpp_bool(x) -> str:
    """A C++ bool literal."""
    return "true" if x else "false"


def op_traits(spec: CollectiveSpec, op: OpFacts, t: Totals) -> list[tuple[str, str, str]]:
    """(C++ type, name, value) of every constant of the op's traits struct."""
    return [
        ("int", "kOpId", str(op_id(spec.name))),
        ("int", "kMaxWorld", str(max(spec.world_sizes))),
        ("int", "kMaxSteps", str(t.max_steps)),
        ("int", "kMaxSrc", str(t.max_src)),
        ("int", "kMaxDst", str(t.max_dst)),
        ("int", "kMaxWait", str(t.max_wait)),
        ("int", "kOutSlots", str(t.out_slots)),
        ("int", "kScrSlots", str(t.scr_slots)),
        ("int", "kInSlots", str(t.in_slots)),
        ("int64_t", "kMaxTiles", f"{t.max_tiles}LL"),
        ("int64_t", "kScrBytes", f"{t.scr_bytes}LL"),
        ("int64_t", "kLLBytes", f"{t.ll_bytes}LL"),
        ("int", "kLLSlots", str(t.ll_slots)),
        ("int64_t", "kStageBytes", f"{t.stage_bytes}LL"),
        ("int64_t", "kMaxInBytes", f"{spec.max_in_bytes(max(spec.world_sizes))}LL"),
        ("int", "kThreads", str(spec.threads)),
        ("int", "kMaxCtas", str(t.max_ctas)),
        ("int", "kReduceOp", str(REDUCE_CODE[spec.reduce])),
        ("Chunks", "kChunks", CHUNKS[op.chunks]),
        ("Gemm", "kGemm", GEMM_CODE[op.gemm]),
        ("bool", "kFused", cpp_bool(spec.fused)),
        ("bool", "kReduces", cpp_bool(op.reduces)),
        ("bool", "kPerTile", cpp_bool(spec.sync == "per_tile")),
        ("bool", "kAllowPeerPtr", cpp_bool(spec.transport != "nvshmem")),
        ("bool", "kRequirePeerPtr", cpp_bool(spec.transport == "nvlink")),
        *epilogue_traits(spec),
        *([("bool", "kDeterministic", cpp_bool(spec.deterministic))] if op.gemm else []),  # (GEMM ops' cuBLASLt)
    ]


QUANT_CODE = {None: 0, "fp8_e4m3": 1}  # collective/epilogue.cuh's kNoQuant, kFp8E4M3


def epilogue_traits(spec: CollectiveSpec) -> list[tuple[str, str, str]]:
    """The epilogue's constants (collective/epilogue.cuh); kAccBytes: the op's buffer it reduces into."""
    e = spec.epilogue
    return [
        ("bool", "kEpilogue", cpp_bool(e)),
        ("bool", "kResidual", cpp_bool(e and e.residual)),
        ("bool", "kRmsNorm", cpp_bool(e and e.rmsnorm)),
        ("int", "kQuant", str(QUANT_CODE[e.quant if e else None])),
        ("float", "kEps", f"{float(e.rmsnorm.eps if e and e.rmsnorm else 0.0)!r}f"),
        ("int64_t", "kAccBytes", f"{spec.max_out_bytes(max(spec.world_sizes)) if e else 0}LL"),
    ]


def render_context(spec: CollectiveSpec, plans: list[Plan]) -> dict:
    t, op = totals(spec, plans), plans[0].op
    worlds = []
    for p in plans:
        variants = []
        for i, v in enumerate(p.variants):
            s = v.schedule
            variants.append({"index": i, "max_bytes": v.max_bytes, "algorithm": s.algorithm, "parts": s.parts,
                             "ctas": v.ctas, "tile_bytes": v.tile_bytes, "nsteps": s.max_steps, "ranks": step_lines(s),
                             "ll": s.sync == "ll",
                             "order": list(v.orders) if v.orders else None})
        worlds.append({"world": p.world, "variants": variants})
    return {
        "desc": op,
        "reduces": op.reduces,
        # the compute stream beside the kernel: the overlap family's context fills these in
        "gemm": False, "gemm_ag": False, "gemm_rs": False, "gemm_nk": [], "fused": False, "overlap": None,
        "fg": None, "ce_choices": None, "b_layout_kn": True,
        "runtime_module": "tilegen.collective.runtime", "runtime_class": "CollectiveOp",
        "premul": spec.premul,
        # every element type the library serves, the call's picked by index (dtype first)
        "dtype_list": [{"name": d, "code": DL_CODES[d][0], "bits": DL_CODES[d][1], "cuda": DTYPES[d][1],
                        "torch": DTYPES[d][2]} for d in spec.all_dtypes],
        "traits": op_traits(spec, op, t),
        "comm_shape": [spec.max_shape[0]] + list(spec.comm_inner),
        "free_inner": ["false"] + ["true" if isinstance(d, DynamicDim) else "false" for d in spec.shape[1:]]
        if not op.gemm else ["false"] * (1 + len(spec.comm_inner)),
        "worlds": worlds,
        "in_world_rows": op.in_world_rows,
        "out_world_rows": op.out_world_rows,
        "out_symmetric": t.out_symmetric and not spec.epilogue,  # (an epilogue op reduces into its own buffer)
        "epilogue": spec.epilogue,
        "alias_code": ALIAS_CODE[op.alias],
    }
