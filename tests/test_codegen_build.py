"""Rendering, determinism, provenance, the committed generated/ tree, the nvcc build and load checks."""
import json
import re
import shutil
from pathlib import Path

import pytest

from tilegen import cli


from tilegen.collective import ops as registry
from tilegen.core.build import BuildError, build_package, nvshmem_header_version
from tilegen.collective.check import verdict_of
from tilegen.collective.render import step_lines
from tilegen.core.render import INCLUDE_DIR, CodegenError, render_package_files
from tilegen.core.files import FileManager, write_files
from tilegen.core.pipeline import generate_op, generate_package
from tilegen.collective.plan import plan
from tilegen.collective.runtime import CollectiveOp
from tilegen.core.runtime import OpLoadError, check_build
from tilegen.core.spec import DynamicDim, KernelSpec
from tilegen.core.spec_files import load_specs
from tilegen.core.calibration import resolve

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
EVIL = 'x"; system("rm -rf /"); /* ünïcode */ #include <evil> {{ 7*7 }} $(id)'


def spec(**kw):
    base = dict(name="ag_test", op="allgather", dtype="bf16", world_sizes=[2, 4],
                shape=[DynamicDim(name="m", max=1024), 4096], description=EVIL)
    base.update(kw)
    return KernelSpec(**base)


def test_rendering_is_deterministic(tmp_path):
    """Twice in one process here; across processes and folders: test_cli's package tests. (The
    checker's verdicts on these plans are test_committed_generated_sources_are_current's.)"""
    specs, _ = load_specs([Path(__file__).parent.parent / "specs"])
    a = generate_package(specs, "3.4.5", check=False)
    b = generate_package(specs, "3.4.5", check=False)
    assert a == b
    write_files(a, tmp_path / "one")
    write_files(b, tmp_path / "two")
    for rel in a:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


def test_spec_strings_never_reach_cuda_source():
    files = generate_op(spec(), "3.4.5")
    for name, text in files.items():
        if name.endswith((".cu", ".cc", ".py")):
            for fragment in ("system(", "evil", "ünïcode", "$(id)", "49"):
                assert fragment not in text, (name, fragment)
    man = json.loads(files["manifest.json"])
    assert man["spec"]["description"] == EVIL  # kept, JSON-escaped, in the manifest only


def test_manifest_records_provenance():
    s = spec()
    man = json.loads(generate_op(s, "3.4.5")["manifest.json"])
    assert man["spec_hash"] == s.spec_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", man["template_hash"])
    assert man["arch"] == "sm_90" and "-gencode=arch=compute_90,code=sm_90" in man["nvcc_flags"]
    assert man["nvshmem_headers"] == "3.4.5"
    from tilegen.collective.plan import plan
    chosen = plan(s, 4, resolve("auto", s.arch)).variants
    assert man["plans"]["4"][-1]["algorithm"] == chosen[-1].schedule.algorithm
    assert man["plans"]["4"][-1]["max_in_bytes"] == s.max_in_bytes(4)
    assert set(man["files"]) == {"ag_test.cu", "ag_test_steps.inc", "ag_test_binding.cc", "op.py"}
    assert "include/tilegen/collective/kernel.cuh" in man["templates"]
    assert not any("overlap" in t or "moe" in t for t in man["templates"])  # a collective's sources only


def test_fused_gemm_ops_render_a_cutlass_kernel_with_tilegens_scheduler(tmp_path):
    from tilegen.core.build import find_toolchain, ninja_file
    from tilegen.core.render import template_files
    ag = KernelSpec(
        name="agf",
        op="ag_gemm",
        dtype="bf16",
        world_sizes=[2, 4],
        shape=[DynamicDim(name="m", max=512), 1024],
        n=768,
        overlap="fused",
        gemm_tile=[128, 128, 64],
        stages=5,
    )
    rs = KernelSpec(
        name="rsf", op="gemm_rs", dtype="f16", world_sizes=[2], shape=[256, 512], n=1024, b_layout="nk", overlap="fused"
    )
    dec = KernelSpec(name="agd", op="ag_gemm", dtype="bf16", world_sizes=[2], shape=[256, 1024], n=768)
    files = generate_op(ag, None)
    src = files["agf_gemm.cu"]
    assert (
        "tilegen::fused::FusedGemm<cutlass::bfloat16_t, /*kBRowMajor=*/true, 128, 128, 64,\n"
        "                                         /*ClusterM=*/1, /*ClusterN=*/1, /*Stages=*/5,\n"
        "                                         /*kGathersA=*/true, /*kPingpong=*/false>"
    ) in src
    pp = generate_op(ag.model_copy(update={"gemm_schedule": "pingpong"}), None)
    assert "/*kPingpong=*/true>" in pp["agf_gemm.cu"]
    assert json.loads(pp["manifest.json"])["fused_gemm"]["kernel"].startswith("KernelTmaWarpSpecializedPingpong")
    assert "TILEGEN_EXPORT_FUSED_GEMM(OpGemm)" in src
    lib = (INCLUDE_DIR / "tilegen/overlap/fused_gemm_op.cuh").read_text()
    assert "ChunkSchedulerTag>" in lib and "KernelTmaWarpSpecializedCooperative" in lib
    assert "Gemm kGemm = Gemm::kConsume;" in files["agf.cu"] and "bool kFused = true;" in files["agf.cu"]
    assert "#define TILEGEN_BINDING_FUSED 1" in files["agf_binding.cc"]
    rs_files = generate_op(rs, None)
    assert "Gemm kGemm = Gemm::kProduce;" in rs_files["rsf.cu"]
    assert (
        "cutlass::half_t, /*kBRowMajor=*/false" in rs_files["rsf_gemm.cu"]
        and "kGathersA=*/false" in rs_files["rsf_gemm.cu"]
    )
    assert "agd_gemm.cu" not in generate_op(dec, None) and 'overlap="copy_engine"' in generate_op(dec, None)["op.py"]
    assert 'overlap="fused"' in files["op.py"]
    man = json.loads(files["manifest.json"])
    assert (
        man["fused_gemm"]["tile"] == [128, 128, 64]
        and "-gencode=arch=compute_90a,code=sm_90a" in man["fused_gemm"]["nvcc_flags"]
    )
    assert "fused_gemm.cu.j2" in template_files(ag, files) and "fused_gemm.cu.j2" not in template_files(dec, {})
    # an op whose GEMM is the same but for its name shares agf's CUTLASS object; another tile does not
    twin = ag.model_copy(update={"name": "agf_twin", "world_sizes": [2]})
    other = ag.model_copy(update={"name": "agf_other", "gemm_tile": [128, 256, 64]})
    write_files(render_package_files({s.name: generate_op(s, None) for s in (ag, dec, twin, other)}), tmp_path)
    ninja = ninja_file(tmp_path, [ag, dec, twin, other], find_toolchain())
    gemm_edges = [line for line in ninja.splitlines() if line.startswith("build _build/fused_gemm_")]
    assert len(gemm_edges) == 2 and all("cu_gemm" in e for e in gemm_edges) and "agd_gemm" not in ninja
    assert "agf/agf_gemm.cu" in gemm_edges[0] and "agf_other/agf_other_gemm.cu" in ninja
    shared = gemm_edges[0].split(":")[0].removeprefix("build ")
    gemm_rule = ninja.split("gemmflags = ")[1].splitlines()[0]
    assert "-rdc" not in gemm_rule and "-DNDEBUG" in gemm_rule and "cutlass" in gemm_rule.lower()
    assert f"build agf/_build/libtilegen_agf.so: link agf/_build/agf.o agf/_build/agf_binding.o {shared}" in ninja
    assert f"build agf_twin/_build/libtilegen_agf_twin.so: link agf_twin/_build/agf_twin.o " \
           f"agf_twin/_build/agf_twin_binding.o {shared}" in ninja
    assert str(tmp_path) not in ninja  # relative inside the package: a copy of it builds alike


def test_gemm_ops_take_their_epoch_from_the_device_and_their_shape_per_world():
    """CUDA-graph safety: every kernel of a GEMM op's call reads the epoch that the op's begin kernel
    advanced on the device (a host value would be frozen into a captured graph); and a spec giving the
    layer's whole n or k yields each world size's share in the wrapper and the fused binding."""
    from tilegen.core.spec import ShardedDim

    ag = KernelSpec(
        name="agf",
        op="ag_gemm",
        dtype="bf16",
        world_sizes=[2, 4],
        shape=[DynamicDim(name="m", max=512), 1024],
        n=ShardedDim(full=4096),
        b_layout="nk",
        overlap="fused",
    )
    rs = KernelSpec(
        name="rsd",
        op="gemm_rs",
        dtype="bf16",
        world_sizes=[2, 4, 8],
        shape=[DynamicDim(name="m", max=512), ShardedDim(full=8192)],
        n=1024,
    )
    host = (INCLUDE_DIR / "tilegen/overlap/host.cuh").read_text()
    assert "begin_call<Op><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(o->epoch_dev);" in host
    assert "p.epoch_src = o->epoch_dev;" in host and "s.epoch = o->epoch_dev;" in host and "host_epoch" not in host
    assert "run() without begin() on the caller's stream first" in host
    files = {s.name: generate_op(s, None, check=False) for s in (ag, rs)}  # rendering only: no checker
    for s, gemm in ((ag, 1), (rs, 2)):
        assert f"#define TILEGEN_BINDING_GEMM {gemm}" in files[s.name][f"{s.name}_binding.cc"]  # exports begin()
    assert "gemm_nk={ 2: (2048, 1024), 4: (1024, 1024) }" in files["agf"]["op.py"]
    assert "gemm_nk={ 2: (1024, 4096), 4: (1024, 2048), 8: (1024, 1024) }" in files["rsd"]["op.py"]
    binding = files["agf"]["agf_binding.cc"]
    assert (
        "case 2: *n = 2048; *k = 1024; return true;" in binding
        and "case 4: *n = 1024; *k = 1024; return true;" in binding
    )


@pytest.mark.parametrize("op, shape", [("allgather", [8, 64]), ("allreduce", [DynamicDim(name="m", max=4096), 1024])])
def test_step_tables_in_source_are_the_checked_plans(op, shape):
    s = spec(op=op, shape=shape, ctas="auto", tile_bytes="auto")
    src = generate_op(s, None)["ag_test_steps.inc"]
    for w in s.world_sizes:
        for i, v in enumerate(plan(s, w, resolve("auto", s.arch)).variants):  # what generate uses
            block = re.search(rf"kSteps_w{w}_v{i}\[{w}\]\[Op::kMaxSteps\] = \{{\n(.*?)\n\}};", src, re.S).group(1)
            codes = [line.split("//")[0].strip().removesuffix(",") for line in block.splitlines() if "St::" in line]
            assert codes == [code for rank in step_lines(v.schedule) for code, _ in rank]
            assert (
                f"{{ {v.max_bytes}LL, {v.schedule.parts}, {v.ctas}, {v.tile_bytes}LL, {v.schedule.max_steps}, "
                f"{'true' if v.schedule.sync == 'll' else 'false'}, kSteps_w{w}_v{i}"
                in src
            )


@pytest.fixture
def fresh_schedule_caches():
    """Schedules and verdicts are memoised; a test that swaps a schedule builder must not see old ones."""
    registry.make_schedule.cache_clear()
    verdict_of.cache_clear()
    yield
    registry.make_schedule.cache_clear()
    verdict_of.cache_clear()


def test_codegen_refuses_a_schedule_the_checker_rejects(monkeypatch, tmp_path, capsys, fresh_schedule_caches):
    import dataclasses

    real = registry.OPS["allgather"].schedules["direct"]

    def no_waits(world, sync):
        good = real(world, sync)
        return dataclasses.replace(good, ranks=tuple(tuple(s for s in r if s.kind != "wait") for r in good.ranks))

    monkeypatch.setitem(registry.OPS["allgather"].schedules, "direct", no_waits)
    with pytest.raises(CodegenError, match="checker rejected the direct schedule"):
        generate_op(spec(), None)
    (tmp_path / "s.yaml").write_text(
        "name: a\nop: allgather\ndtype: f32\nworld_sizes: [2]\nshape: [4]\nschedule: direct\n"
    )
    assert cli.main(["generate", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "out"), "--no-build"]) == 1
    assert "unsynchronised read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_file_manager_writes_only_changed_files(tmp_path):
    fm = FileManager(tmp_path)
    p = fm.write("a/b.txt", "one")
    mtime = p.stat().st_mtime_ns
    fm2 = FileManager(tmp_path)
    fm2.write("a/b.txt", "one")
    assert fm2.unchanged == [p] and p.stat().st_mtime_ns == mtime
    fm2.write("a/b.txt", "two")
    assert p.read_text() == "two" and fm2.written == [p]
    assert not list(tmp_path.glob("a/.*"))  # no temporary files left behind


def test_committed_generated_sources_are_current(root, capsys):
    rc = cli.main(["generate", str(root / "specs"), "-o", str(root / "generated"), "--check"])
    assert rc == 0, capsys.readouterr().err


def test_drift_check_names_stale_files(root, tmp_path, capsys):
    shutil.copytree(
        root / "generated", tmp_path / "generated", ignore=shutil.ignore_patterns("_build", ".ninja*", "*.ninja")
    )
    shutil.rmtree(tmp_path / "generated/_include")  # not committed: a fresh clone has none, and is current
    assert cli.main(["generate", str(root / "specs"), "-o", str(tmp_path / "generated"), "--check"]) == 0
    cu = tmp_path / "generated/allgather_bf16/allgather_bf16.cu"
    cu.write_text(cu.read_text() + "// hand edit\n")
    assert cli.main(["generate", str(root / "specs"), "-o", str(tmp_path / "generated"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "allgather_bf16/allgather_bf16.cu" in err and "_include" not in err


def _fake_build(tmp_path, **over):
    d = tmp_path / "op"
    (d / "_build").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"spec_hash": "abc"}))
    info = {
        "spec_hash": "abc",
        "tilegen_version": "0.1.0",
        "nvshmem": "3.4.5",
        "arch": "sm_90",
        "library": "libtilegen_op.so",
    }
    info.update(over)
    (d / "_build" / "build.json").write_text(json.dumps(info))
    (d / "_build" / "libtilegen_op.so").write_text("")
    return d


def test_loading_checks_nvshmem_arch_and_tilegen_versions(tmp_path):
    ok = _fake_build(tmp_path / "a")
    assert check_build(ok, "op", "3.4.5", "sm_90").name == "libtilegen_op.so"
    with pytest.raises(
        OpLoadError, match=r"built against NVSHMEM 3\.4\.5 .*but this process runs NVSHMEM 3\.8\.0; install a build"
    ):
        check_build(ok, "op", "3.8.0", "sm_90")
    with pytest.raises(OpLoadError, match=r"holds GPU code for sm_90 only, but this GPU is sm_100.*tilegen generate"):
        check_build(ok, "op", "3.4.5", "sm_100")
    fat = _fake_build(tmp_path / "fat", archs=["sm_90a", "sm_100a"])  # generate --archs: one fat binary
    assert check_build(fat, "op", "3.4.5", "sm_100").name == "libtilegen_op.so"
    with pytest.raises(OpLoadError, match=r"holds GPU code for sm_90a, sm_100a only, but this GPU is sm_80"):
        check_build(fat, "op", "3.4.5", "sm_80")
    with pytest.raises(OpLoadError, match="built by tilegen 0.0.1"):
        check_build(_fake_build(tmp_path / "b", tilegen_version="0.0.1"), "op", "3.4.5", "sm_90")
    with pytest.raises(OpLoadError, match="another version of its spec"):
        check_build(_fake_build(tmp_path / "c", spec_hash="zzz"), "op", "3.4.5", "sm_90")
    with pytest.raises(OpLoadError, match="is not built here"):
        check_build(tmp_path / "missing", "op", None, None)


@pytest.mark.slow
@needs_nvcc
def test_generate_builds_every_spec_and_rebuilds_only_what_changed(root, tmp_path, capsys):
    """Every example spec builds (in a copy of the checkout's generated/: README's set-up command has
    built it there, and a build is current wherever it was made, so only what is new here compiles),
    and a rerun rebuilds only what changed."""
    specs = tmp_path / "specs"
    shutil.copytree(root / "specs", specs)
    fused = (specs / "ag_gemm_bf16_fused.yaml").read_text()  # (a 2x1 cluster compiles too, and the pingpong schedule)
    for name, extra in (("ag_fused_t128x256x64_c2x1", "gemm_tile: [128, 256, 64]\ngemm_cluster: [2, 1]\n"),
                        ("ag_fused_t128x128x64_pp_c2x1", "gemm_tile: [128, 128, 64]\ngemm_cluster: [2, 1]\n"
                                                         "gemm_schedule: pingpong\n")):
        text = re.sub(r"(?m)^gemm_tile: .*\n", extra, re.sub(r"(?m)^name: \S+", f"name: {name}", fused))
        (specs / f"{name}.yaml").write_text(text)
    out = tmp_path / "pkg"
    shutil.copytree(root / "generated", out, ignore=shutil.ignore_patterns(".tilegen.lock"))
    assert cli.main(["generate", str(specs), "-o", str(out), "-j", "2", "-q"]) == 0
    for name in ("allgather_bf16", "allgather_f16_nvshmem", "ag_gemm_bf16_fused", "gemm_rs_bf16_fused",
                 "ag_fused_t128x256x64_c2x1", "ag_fused_t128x128x64_pp_c2x1"):
        lib = out / name / "_build" / f"libtilegen_{name}.so"
        assert lib.stat().st_size > 0
        info = json.loads((out / name / "_build" / "build.json").read_text())
        assert info["nvshmem"] == nvshmem_header_version() and re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc"])
        assert (info["cutlass"] is not None) == ("_fused" in name)
    capsys.readouterr()
    assert cli.main(["generate", str(specs), "-o", str(out), "-q"]) == 0
    assert "up to date: nothing rebuilt" in capsys.readouterr().out
    y = specs / "allgather_bf16.yaml"
    assert "ctas: auto" in y.read_text()
    y.write_text(y.read_text().replace("ctas: auto", "ctas: 128"))
    before = (out / "allgather_f16_nvshmem/_build/libtilegen_allgather_f16_nvshmem.so").stat().st_mtime_ns
    assert cli.main(["generate", str(specs), "-o", str(out), "-q"]) == 0
    assert "built 2 step(s)" in capsys.readouterr().out  # the changed op's kernel and link, nothing else
    assert (out / "allgather_f16_nvshmem/_build/libtilegen_allgather_f16_nvshmem.so").stat().st_mtime_ns == before


@needs_nvcc
def test_nvcc_failure_names_spec_file_and_message(tmp_path):
    s = spec(world_sizes=[2])
    files = generate_package([type("L", (), {"spec": s})()], None)
    files["ag_test/ag_test.cu"] += "\nint broken = undeclared_thing;\n"
    write_files(files, tmp_path)
    with pytest.raises(BuildError) as e:
        build_package(tmp_path, [s], {"ag_test": "specs/ag_test.yaml"}, progress=False)
    msg = str(e.value)
    assert "build of op ag_test (spec specs/ag_test.yaml) failed at ag_test/_build/ag_test.o" in msg
    assert "undeclared_thing" in msg and "error" in msg


@pytest.mark.slow  # ~7 s of nvcc; the ops' own builds compile what they use
@needs_nvcc
def test_every_device_primitive_compiles(root, tmp_path):
    import subprocess
    from tilegen.core.build import find_toolchain

    tc = find_toolchain()
    cmd = [
        tc.nvcc,
        "-std=c++17",
        "-rdc=true",
        "-gencode=arch=compute_90,code=sm_90",
        f"-I{root}/tilegen/include",
        f"-I{tc.nvshmem_dir}/include",
        "-c",
        str(root / "tests/device/primitives.cu"),
        "-o",
        str(tmp_path / "p.o"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    syms = subprocess.run(["nm", "-C", str(tmp_path / "p.o")], capture_output=True, text=True).stdout  # host stubs
    for k in ("loads_stores_fences", "waits", "votes", "moves", "barriers"):
        assert k in syms


@pytest.mark.slow  # ~5 s of nvcc
@needs_nvcc
def test_grids_count_only_the_sms_this_process_may_fill(root, tmp_path):
    """host::sm_share, which sizes every kernel that needs all its CTAs resident (collective grids, MoE
    waves, the fused GEMM beside its communication kernel): the device's SMs, capped by the context's count
    and an MPS client's percentage (ranks sharing a GPU under MPS hung when grids counted the whole
    device); never below one SM."""
    import subprocess
    from tilegen.core.build import find_toolchain

    cases = [(132, 0, None, 132), (132, 132, None, 132), (132, 66, None, 66), (132, 0, "50", 66),
             (132, 0, "25.5", 33), (132, 44, "50", 44), (132, 100, "50", 66), (132, 0, "100", 132),
             (132, 0, "0", 132), (132, 0, "-5", 132), (132, 0, "0.1", 1), (132, 200, None, 132)]
    arg = lambda pct: f'"{pct}"' if pct else "nullptr"  # noqa: E731
    body = "".join(f'  printf("%d\\n", tilegen::host::sm_share({n}, {ctx}, {arg(pct)}));\n'
                   for n, ctx, pct, _ in cases)
    (tmp_path / "share.cu").write_text(
        '#include <cstdio>\n#include "tilegen/host/sms.cuh"\nint main() {\n' + body + "}\n")
    tc = find_toolchain()
    subprocess.run([tc.nvcc, "-std=c++17", f"-I{root}/tilegen/include", str(tmp_path / "share.cu"), "-o",
                    str(tmp_path / "share")], check=True, capture_output=True)  # (no NVSHMEM: the fused GEMM's too)
    got = subprocess.run([str(tmp_path / "share")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in got] == [want for *_, want in cases], cases


def test_tilegen_list_shows_ops_and_provenance(root, capsys):
    assert cli.main(["list", str(root / "generated")]) == 0
    out = capsys.readouterr().out
    assert "allgather_bf16" in out and "allgather_f16_nvshmem" in out and "sm_90" in out


@pytest.mark.slow
def test_concurrent_generate_runs_leave_a_consistent_package(root, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pkg"
    cmd = [sys.executable, "-m", "tilegen.cli", "generate", str(root / "specs"), "-o", str(out), "--no-build", "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    assert all(p.wait(timeout=1800) == 0 for p in procs)  # a hang guard only: 4 runs share 2 cores
    assert cli.main(["generate", str(root / "specs"), "-o", str(out), "--check"]) == 0
    leftovers = [p for p in out.rglob(".*") if p.name not in (".tilegen.lock", cli.VERDICTS)]
    assert leftovers == []  # no half-written temporary files


def test_an_op_refuses_a_job_of_another_world_size(monkeypatch):
    from tilegen.core import runtime

    monkeypatch.setitem(runtime._state, "initialised", True)
    monkeypatch.setitem(runtime._state, "world", 3)
    op = runtime.GeneratedOp(Path("/nonexistent"), "ag", "allgather", "bfloat16", [8, 8], [2, 4, 8])
    with pytest.raises(OpLoadError, match=r"generated for world sizes \[2, 4, 8\], this job has 3 ranks"):
        op.load()


def test_calls_before_init_say_what_to_do(monkeypatch):
    from tilegen.core import runtime

    monkeypatch.setitem(runtime._state, "initialised", False)
    op = CollectiveOp(Path("/nonexistent"), "ag", "allgather", "bfloat16", [8, 8], [2])
    with pytest.raises(RuntimeError, match=r"call tilegen.init\(\) first"):
        op(None)


def test_wait_bound_comes_from_call_then_environment_then_spec(monkeypatch):
    from tilegen.core import runtime

    op = runtime.GeneratedOp(Path("/nonexistent"), "ag", "allgather", "bfloat16", [8, 8], [2], default_timeout_ms=250)
    monkeypatch.delenv("TILEGEN_WAIT_TIMEOUT_MS", raising=False)
    assert op._timeout_ns(None) == 250_000_000
    monkeypatch.setenv("TILEGEN_WAIT_TIMEOUT_MS", "40")
    assert op._timeout_ns(None) == 40_000_000
    assert op._timeout_ns(0) == 0 and op._timeout_ns(1.5) == 1_500_000
    monkeypatch.setattr(runtime, "_capturing", lambda handle: True)  # a captured call cannot report: defaults off
    assert op._timeout_ns(None, 7) == 0 and op._timeout_ns(0, 7) == 0
    with pytest.raises(RuntimeError, match=r"ag: bounded waits \(timeout_ms > 0\).*capture with timeout_ms=0"):
        op._timeout_ns(1.5, 7)
    monkeypatch.delenv("TILEGEN_WAIT_TIMEOUT_MS")
    assert op._timeout_ns(None, 7) == 0
    monkeypatch.setenv("TILEGEN_WAIT_TIMEOUT_MS", "soon")
    with pytest.raises(ValueError, match="TILEGEN_WAIT_TIMEOUT_MS must be a number"):
        op._timeout_ns(None)
    with pytest.raises(ValueError, match="timeout_ms must be >= 0"):
        op._timeout_ns(-1)


def test_a_premul_op_takes_its_scale_at_call_time(monkeypatch):
    """reduce: avg scales by 1 / the group's size; premul_sum takes scale= per call; other ops refuse a scale."""
    from tilegen.core import runtime
    from tilegen.core.group import Group

    monkeypatch.setitem(runtime._state, "initialised", True)
    monkeypatch.setitem(runtime._state, "world", 4)
    monkeypatch.setitem(runtime._state, "rank", 2)
    calls = []
    op = CollectiveOp(Path("/nonexistent"), "ar", "allreduce", "bfloat16", [8, 8], [2, 4], premul="avg")
    op._run, op._world = lambda *a: calls.append(a[3]), 4  # (as load() leaves a loaded op: the world's group)
    op._mod = type("Library", (), {"select": lambda self, slot: calls.append(("select", slot))})()
    monkeypatch.setattr(op, "empty_output", lambda rows, group=None: "out")
    op("x", "out")
    op("x", "out", group=Group((2, 3), 1, 0))
    op("x", "out")
    assert calls == [0.25, ("select", 1), 0.5, ("select", 0), 0.25]
    with pytest.raises(ValueError, match="reduce avg scales by 1 / world itself"):
        op("x", "out", scale=2.0)
    pm = CollectiveOp(Path("/nonexistent"), "ar", "allreduce", "bfloat16", [8, 8], [4], premul="premul_sum")
    pm._run = lambda *a: calls.append(a[3])
    pm("x", "out", scale=0.5)
    assert calls[-1] == 0.5
    for bad, msg in ((None, "needs scale="), ("half", "scale must be a number"), (float("nan"), "must be finite")):
        with pytest.raises(ValueError, match=msg):
            pm("x", "out", scale=bad)
    plain = CollectiveOp(Path("/nonexistent"), "ar", "allreduce", "bfloat16", [8, 8], [4])
    plain._run = lambda *a: calls.append(a[3])
    plain("x", "out")
    assert calls[-1] == 1.0
    with pytest.raises(ValueError, match="scale= is for ops with reduce: premul_sum"):
        plain("x", "out", scale=2.0)
