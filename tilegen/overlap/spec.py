"""The overlap family's spec: a GEMM and the collective that feeds it or takes its output
(ag_gemm: C = allgather(A) @ B; gemm_rs: C = reduce_scatter(A @ B)), overlapped by the copy engines,
a communication kernel beside per-chunk GEMMs (decomposed), or one fused CUTLASS GEMM."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, Tag

from pydantic import Discriminator

from ..collective.ops import GEMM_OPS, OPS
from ..collective.plan import max_gemm_comm_ctas
from ..collective.spec import CollectiveSpec
from ..core.spec import ShardedDim, article, dim_size

GemmKind = Literal[GEMM_OPS]  # type: ignore[valid-type]


def _n_kind(v) -> str:
    return "sharded" if isinstance(v, (ShardedDim, dict)) else "static"


GemmN = Annotated[Union[Annotated[Annotated[int, Field(gt=0, le=1 << 20)], Tag("static")],
                        Annotated[ShardedDim, Tag("sharded")]], Discriminator(_n_kind)]


class GemmSpec(CollectiveSpec):
    """A GEMM op: its communication kernel's fields (decomposed and fused styles) and the GEMM's."""

    op: GemmKind = Field(description="what the op computes: " + "; ".join(f"{k}: {OPS[k].summary}" for k in GEMM_OPS))
    n: GemmN = Field(
        description="columns of B. ag_gemm: C = allgather(A[m, k]) @ B is [world*m, n]; gemm_rs: C = "
                    "reduce_scatter(A[world*m, k] @ B) is [m, n]. ag_gemm may give {full: N}: the whole layer's "
                    "n, each rank holding N / world columns")
    b_layout: Literal["kn", "nk"] = Field(
        default="kn", description="ag_gemm: B stored [k, n] or [n, k] (a torch Linear weight)")
    overlap: Literal["auto", "copy_engine", "decomposed", "fused"] = Field(
        default="auto", description="copy_engine (per-chunk cuBLAS GEMMs; the chunks move by cudaMemcpyAsync "
                                    "between symmetric buffers over NVLink, no SMs; gemm_rs reduces in the last "
                                    "GEMM's epilogue), decomposed (a communication kernel + per-chunk cuBLAS GEMMs "
                                    "that wait on its signals in stream order), fused (one CUTLASS Hopper GEMM "
                                    "whose tile scheduler waits on the gather's flags / publishes finished parts; "
                                    "sm_90, bf16/f16), or auto (copy_engine, the fastest style measured; "
                                    "docs/measurements.md)")
    gemm_tile: Optional[Annotated[list[int], Field(min_length=3, max_length=3)]] = Field(
        default=None, description="fused GEMM tile [m, n, k] (default [128, 256, 64]): m 128 or 256, n 64, 128, "
                                  "192 or 256, k 64 or 128")
    gemm_cluster: Optional[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        default=None, description="fused GEMM: thread-block cluster [m, n] (default [1, 1]), each 1 or 2: the "
                                  "CTAs of a cluster share their B tile (m 2) or A tile (n 2) by TMA multicast")
    gemm_schedule: Optional[Literal["cooperative", "pingpong"]] = Field(
        default=None, description="fused ag_gemm: CUTLASS's kernel schedule, cooperative (default: two warp groups "
                                  "share each tile) or pingpong (each warp group its own tile, one's math beside "
                                  "the other's epilogue; tiles of at most 128 x 128 outputs)")
    stages: Union[Annotated[int, Field(ge=2, le=8)], Literal["auto"]] = Field(
        default="auto", description="fused GEMM: shared-memory pipeline stages of the mainloop, or auto (as many "
                                    "as fit beside the epilogue)")

    def _check_operands(self) -> None:
        self._fixed_inner()
        if len(self.shape) != 2:
            raise ValueError(f"shape: {self.op} takes A's shard as [m, k], got {len(self.shape)} dimensions")
        if self.dtype not in ("bf16", "f16", "f32"):
            raise ValueError(f"dtype: {self.op} multiplies bf16, f16 or f32 (fp32 accumulation), not {self.dtype}")
        if self.dtypes is not None and self.dtypes != [self.dtype]:
            raise ValueError(f"dtypes: {self.op} serves one element type (its GEMMs are built for it), got "
                             f"{self.dtypes}")
        self._check_sharding()
        limit = max_gemm_comm_ctas(self.sm)
        if self.ctas != "auto" and self.ctas > limit:
            raise ValueError(
                f"ctas: {article(self.op)} communication kernel runs beside the GEMMs and must leave them the "
                f"GPU: at most {limit} CTAs on {self.arch} (or auto), got {self.ctas}"
            )
        if self.overlap_style == "copy_engine":
            self._check_copy_engine()
        why_not = self._fused_unsupported()
        if self.overlap == "fused" and why_not:
            raise ValueError(f"overlap: fused needs {why_not}; use decomposed or auto")
        self._check_fused_settings()

    def _check_deterministic(self) -> None:
        """gemm_rs, every overlap style: its GEMM's K order must not change with the row count (the fused
        kernel's tile is the spec's, each output tile one CTA's over all of K; the decomposed and copy-engine
        GEMMs run one pinned cuBLASLt algorithm for every row count), and ranks' partials add in an order
        fixed per rank (the fused and decomposed styles: the reduce-scatter's, in rank order; the copy
        engines: the direct style)."""
        if self.op != "gemm_rs":
            raise ValueError(f"deterministic: {self.op} adds nothing across ranks (its rows are gathered, not "
                             f"reduced); gemm_rs takes it")
        super()._check_deterministic()

    def _check_fused_settings(self) -> None:
        if self.gemm_tile is not None:
            m, n_, k = self.gemm_tile
            if m not in (128, 256) or n_ not in (64, 128, 192, 256) or k not in (64, 128):
                raise ValueError(f"gemm_tile: expected [m, n, k] with m 128 or 256, n 64/128/192/256, k 64 or 128, "
                                 f"got {self.gemm_tile}")
        if self.gemm_cluster is not None and any(c not in (1, 2) for c in self.gemm_cluster):
            raise ValueError(f"gemm_cluster: expected [m, n] with each 1 or 2, got {self.gemm_cluster}")
        set_fields = (("gemm_tile", self.gemm_tile is not None), ("gemm_cluster", self.gemm_cluster is not None),
                      ("gemm_schedule", self.gemm_schedule is not None), ("stages", self.stages != "auto"))
        fused_only = [f for f, given in set_fields if given]
        if not self.fused and fused_only:
            raise ValueError(f"{fused_only[0]}: only the fused overlap takes GEMM tiles, clusters, schedules and "
                             f"stages (this spec's overlap is {self.overlap_style})")
        if self.gemm_schedule == "pingpong":
            m, n_, _ = self.gemm_tile_shape
            if self.op != "ag_gemm":
                raise ValueError("gemm_schedule: pingpong is for ag_gemm (gemm_rs publishes parts of C from the "
                                 "cooperative kernel's epilogue)")
            if m * n_ > 128 * 128:
                raise ValueError(f"gemm_schedule: a pingpong warp group holds a whole tile's accumulators: at "
                                 f"most 128 x 128 outputs, got gemm_tile {list(self.gemm_tile_shape)}")

    def _check_sharding(self) -> None:
        """A sharded dim must be ag_gemm's n or gemm_rs's k, and split evenly at every world size."""
        k = self.shape[1]
        if isinstance(self.n, ShardedDim) and self.op != "ag_gemm":
            raise ValueError("n: only ag_gemm's n may be sharded ({full: N}); gemm_rs shards k (shape[1])")
        if isinstance(k, ShardedDim) and self.op != "gemm_rs":
            raise ValueError("shape: only gemm_rs's k (shape[1]) may be sharded ({full: K}); ag_gemm shards n")
        for field_, d in (("n", self.n), ("shape", k)):
            if isinstance(d, ShardedDim):
                bad = [w for w in self.world_sizes if d.full % w]
                if bad:
                    raise ValueError(f"{field_}: {{full: {d.full}}} does not split evenly over world sizes {bad}")

    def _check_copy_engine(self) -> None:
        """The copy-engine overlap copies between peers' memory over NVLink and runs no communication kernel."""
        if self.transport == "nvshmem":
            raise ValueError("transport: the copy-engine overlap copies over NVLink (P2P); use transport auto or "
                             "nvlink, or overlap: decomposed")
        given = self.kernel_settings()
        if given and self.overlap == "copy_engine":
            raise ValueError(f"{given[0]}: the copy-engine overlap runs no communication kernel, so it takes no "
                             f"{given[0]}; leave it out or use overlap: decomposed")

    def _fused_unsupported(self) -> str | None:
        """Why the fused GEMM (CUTLASS sm_90 TMA/wgmma) cannot run this spec, or None."""
        if not self.arch.startswith("sm_90"):
            return f"a Hopper target (arch sm_90 or sm_90a), not {self.arch}"
        if self.dtype not in ("bf16", "f16"):
            return f"bf16 or f16, not {self.dtype}"
        for w in self.world_sizes:
            n, k = self.gemm_nk(w)
            if n % 8 or k % 8:
                return f"n and k multiples of 8 (16-byte rows for TMA), got n {n}, k {k} at world {w}"
        return None

    @property
    def overlap_style(self) -> str:
        """The overlap the op runs (auto resolved)."""
        if self.overlap != "auto":
            return self.overlap
        # auto: the copy engines where the spec leaves the communication kernel's settings open
        # (it beat the decomposed and fused styles in every measured row: docs/measurements.md)
        return "decomposed" if self.kernel_settings() or self.transport == "nvshmem" else "copy_engine"

    @property
    def fused(self) -> bool:
        """One fused GEMM kernel beside the communication kernel (else per-chunk cuBLAS)."""
        return self.overlap == "fused"

    @property
    def uses_cutlass(self) -> bool:
        return self.fused

    def gemm_nk(self, world: int) -> tuple[int, int]:
        """This rank's (n, k) at ``world`` ranks."""
        return dim_size(self.n, world), dim_size(self.shape[1], world)

    @property
    def gemm_tile_shape(self) -> tuple[int, int, int]:
        return tuple(self.gemm_tile) if self.gemm_tile is not None else (128, 256, 64)

    @property
    def gemm_cluster_shape(self) -> tuple[int, int]:
        return tuple(self.gemm_cluster) if self.gemm_cluster is not None else (1, 1)

    @property
    def comm_inner(self) -> tuple[int, ...]:
        """gemm_rs moves partial C ([.., n]); ag_gemm moves A."""
        return (dim_size(self.n),) if self.op == "gemm_rs" else tuple(self.max_shape[1:])
