"""Everyday use of the command line: fast no-op generates, packages that keep their ops, Python
configs as code, clear errors instead of tracebacks, output that fits a terminal, reproducible output."""
import fcntl
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tilegen import cli, pipeline

SMALL = ("allgather_bf16.yaml", "broadcast_f32.yaml", "reduce_bf16.yaml")


@pytest.fixture
def specs(root, tmp_path):
    d = tmp_path / "specs"
    d.mkdir()
    for name in SMALL:
        shutil.copy(root / "specs" / name, d / name)
    return d


@pytest.fixture
def count_checks(monkeypatch):
    """Counts the checker's runs (the in-process memo is cleared: only the verdict file may help)."""
    calls = []
    real = pipeline.check_schedule

    def counting(*a, **kw):
        calls.append(a[0].op)
        return real(*a, **kw)
    monkeypatch.setattr(pipeline, "check_schedule", counting)
    pipeline.verdict_of.cache_clear()
    yield calls
    pipeline.verdict_of.cache_clear()


def test_a_rerun_with_nothing_changed_checks_nothing(specs, tmp_path, count_checks, capsys):
    out = tmp_path / "pkg"
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    first = len(count_checks)
    assert first > 0 and (out / cli.VERDICTS).exists()
    pipeline.verdict_of.cache_clear()
    t0 = time.perf_counter()
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    assert len(count_checks) == first, "a no-op generate re-ran the checker"
    assert time.perf_counter() - t0 < 5  # measured: ~0.2 s for these three specs
    # a changed spec re-checks its own new schedules, nothing else
    y = specs / "broadcast_f32.yaml"
    y.write_text(y.read_text().replace("world_sizes: [2, 4, 8]", "world_sizes: [2, 3, 4, 8]"))
    pipeline.verdict_of.cache_clear()
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    assert count_checks[first:] and set(count_checks[first:]) == {"broadcast"}


def test_a_checker_change_invalidates_remembered_verdicts(monkeypatch, specs, tmp_path, count_checks):
    out = tmp_path / "pkg"
    assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "--no-build"]) == 0
    n = len(count_checks)
    pipeline.verdict_of.cache_clear()
    monkeypatch.setattr(pipeline, "checker_version", lambda: "another checker")
    assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "--no-build"]) == 0
    assert len(count_checks) == 2 * n


def test_generating_one_spec_keeps_the_packages_other_ops(specs, tmp_path, capsys):
    out = tmp_path / "pkg"
    assert cli.main(["generate", str(specs / "allgather_bf16.yaml"), "-o", str(out), "--no-build"]) == 0
    assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "--no-build"]) == 0
    assert "kept 1 op(s) of earlier runs that no spec of this run generates: allgather_bf16 (--prune removes them)" \
        in capsys.readouterr().out
    init = (out / "__init__.py").read_text()
    assert "OPS = ['allgather_bf16', 'reduce_bf16']" in init and (out / "allgather_bf16" / "manifest.json").exists()
    assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "--check"]) == 0
    assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "--no-build", "--prune"]) == 0
    assert "removed 1 op(s) no spec of this run generates: allgather_bf16" in capsys.readouterr().out
    assert not (out / "allgather_bf16").exists() and "OPS = ['reduce_bf16']" in (out / "__init__.py").read_text()


def test_package_files_do_not_depend_on_the_folder_name(specs, tmp_path):
    for name in ("one", "two"):
        assert cli.main(["generate", str(specs), "-o", str(tmp_path / name), "--no-build"]) == 0
    for f in (tmp_path / "one").rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            assert f.read_bytes() == (tmp_path / "two" / f.relative_to(tmp_path / "one")).read_bytes(), f


@pytest.mark.parametrize("bad, message", [
    ("nc-genA", "'nc-genA' is not a Python module name"),
    ("a_file", "exists and is not a directory"),
])
def test_unusable_output_folders_are_refused(specs, tmp_path, capsys, bad, message):
    (tmp_path / "a_file").write_text("x")
    assert cli.main(["generate", str(specs), "-o", str(tmp_path / bad), "--no-build"]) == 1
    assert message in capsys.readouterr().err


def test_python_configs_are_code_only_spec_files_run_and_they_can_be_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "helper.py").write_text(f"open({str(marker)!r}, 'w').write('helper ran')\n")
    (tmp_path / "s.py").write_text("SPEC = dict(name='s', op='allgather', dtype='f32', world_sizes=[2], shape=[8])\n")
    assert cli.main(["validate", str(tmp_path)]) == 0
    assert not marker.exists(), "a helper without SPEC was executed"
    capsys.readouterr()
    assert cli.main(["validate", "--no-python", str(tmp_path)]) == 1
    assert "s.py:1:1: <file>: a Python config runs as code; refused (--no-python)" in capsys.readouterr().err
    assert cli.main(["plan", "--no-python", str(tmp_path / "s.py")]) == 1


def test_a_binary_python_spec_is_a_located_problem_beside_the_others(tmp_path, capsys):
    (tmp_path / "bin.py").write_bytes(b"SPEC = 1\n\xff\xfe\x00garbage")
    (tmp_path / "bad.yaml").write_text("name: x\nop: allgather\ndtype: bf17\nworld_sizes: [2]\nshape: [8]\n")
    assert cli.main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bin.py:1:1: <file>: cannot read as UTF-8 Python" in err and "bad.yaml:3:8: dtype:" in err
    assert "Traceback" not in err


def test_plan_refuses_a_world_size_the_spec_lacks(root, capsys):
    assert cli.main(["plan", str(root / "specs/allgather_bf16.yaml"), "--world", "0"]) == 1
    assert "world size 0 is not in the spec's world_sizes [2, 4, 8]" in capsys.readouterr().err


def test_list_says_what_is_wrong_and_fits_100_columns(root, tmp_path, capsys):
    assert cli.main(["list", str(tmp_path / "nonexistent")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["list", str(tmp_path)]) == 1
    assert "no generated ops here" in capsys.readouterr().err
    assert cli.main(["list", str(root / "generated")]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "reduce_scatter_f16_min_nvshmem" in out  # names are not folded


def test_plan_prints_sizes_for_people(root, capsys):
    assert cli.main(["plan", str(root / "specs/allreduce_bf16.yaml"), "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "each at its best CTA count and tile (* the choice)" in out
    assert "input up to 128 MiB per rank" in out and "   64 KiB" in out and "inputs <= 64 KiB:" in out


def test_a_waiting_generate_says_for_whom(specs, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    with open(out / ".tilegen.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("tilegen generate (pid 12345)")
        f.flush()
        threading.Timer(3.0, lambda: fcntl.flock(f, fcntl.LOCK_UN)).start()
        spec = str(specs / "reduce_bf16.yaml")
        cmd = [sys.executable, "-m", "tilegen.cli", "generate", spec, "-o", str(out), "--no-build"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"waiting for tilegen generate (pid 12345), which is generating into {out}" in r.stderr


@pytest.mark.slow
@pytest.mark.nvcc
def test_builds_in_two_folders_differ_only_where_nvcc_makes_them(specs, tmp_path):
    """Host code is byte-identical across output folders and no library embeds its folder's path;
    nvcc's own temporary names (tmpxft_<pid>_...) still make kernel objects differ (docs/design.md)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    libs = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "-q"]) == 0
        build = out / "reduce_bf16" / "_build"
        libs.append((build / "reduce_bf16_binding.o").read_bytes())
        assert str(out).encode() not in (build / "libtilegen_reduce_bf16.so").read_bytes()
    assert libs[0] == libs[1]


def test_generated_package_loads_its_ops_in_one_collective_order(specs, tmp_path, monkeypatch):
    """pkg.load(): every op (or the named ones) in a fixed order, so every rank can load them at
    start-up instead of in whichever first call each rank makes."""
    import importlib
    out = tmp_path / "pkgload"
    assert cli.main(["generate", str(specs / "allgather_bf16.yaml"), str(specs / "reduce_bf16.yaml"),
                     "-o", str(out), "--no-build"]) == 0
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = importlib.import_module("pkgload")
    try:
        loaded = []
        for name in pkg.OPS:
            monkeypatch.setattr(pkg, name, type("Fake", (), {"load": lambda self, n=name: loaded.append(n)})(),
                                raising=False)
        pkg.load()
        assert loaded == ["allgather_bf16", "reduce_bf16"]
        pkg.load("reduce_bf16")
        assert loaded[-1] == "reduce_bf16" and len(loaded) == 3
        with pytest.raises(AttributeError, match="has no op 'nope'"):
            pkg.load("nope")
    finally:
        sys.modules.pop("pkgload", None)


def test_plan_of_a_moe_spec_prints_its_layout_and_the_check(root, capsys, monkeypatch):
    assert cli.main(["plan", str(root / "specs/moe_bf16_ll.yaml"), "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "low_latency mode, world 4: 256 experts, 64 per rank, top-8" in out
    assert "fixed segments of 128 rows per (local expert, source)" in out and "MoE check" in out and ": ok" in out
    assert cli.main(["plan", str(root / "specs/moe_f32_k3.yaml"), "--world", "8"]) == 1
    assert "world_sizes: moe_f32_k3 was specified for world sizes [2, 4], not 8" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "moe_problems", lambda w, e, k, mode: ("seed 1: rank 0: rows written twice [3]",))
    assert cli.main(["plan", str(root / "specs/moe_bf16.yaml"), "--world", "2"]) == 1
    assert "FAILED\n  seed 1: rank 0: rows written twice [3]" in capsys.readouterr().out


def test_bench_times_collectives_and_names_the_benchmark_of_the_others(monkeypatch):
    from tilegen import bench
    ops = {n: type("Op", (), {"kind": k})() for n, k in
           (("ar", "allreduce"), ("moe_x", "moe"), ("ag_x", "ag_gemm"), ("ag", "allgather"))}
    fake = type("Pkg", (), dict(ops, OPS=list(ops)))
    monkeypatch.setattr(bench.importlib, "import_module", lambda name: fake)
    assert [op.kind for op in bench.resolve("pkg:*")] == ["allreduce", "allgather"]
    with pytest.raises(ValueError, match="a moe op is timed by tools/bench_moe.py"):
        bench.resolve("pkg:moe_x")
    with pytest.raises(ValueError, match="a ag_gemm op is timed by tools/bench_gemm.py"):
        bench.resolve("pkg:ag_x")
