"""Everyday use of the command line: fast no-op generates, packages that keep their ops, Python
configs as code, clear errors instead of tracebacks, output that fits a terminal, reproducible output."""
import fcntl
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tilegen import cli
from tilegen.collective.check import verdict_of

from tilegen.core import pipeline

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
    from tilegen.collective import check
    calls = []
    real = check.check_schedule

    def counting(*a, **kw):
        calls.append(a[0].op)
        return real(*a, **kw)
    monkeypatch.setattr(check, "check_schedule", counting)
    check.verdict_of.cache_clear()
    yield calls
    check.verdict_of.cache_clear()


def test_a_rerun_with_nothing_changed_checks_nothing(specs, tmp_path, count_checks, capsys):
    out = tmp_path / "pkg"
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    first = len(count_checks)
    assert first > 0 and (out / cli.VERDICTS).exists()
    verdict_of.cache_clear()
    t0 = time.perf_counter()
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    assert len(count_checks) == first, "a no-op generate re-ran the checker"
    assert time.perf_counter() - t0 < 5  # measured: ~0.2 s for these three specs
    # a changed spec re-checks its own new schedules, nothing else
    y = specs / "broadcast_f32.yaml"
    y.write_text(y.read_text().replace("world_sizes: [2, 4, 8]", "world_sizes: [2, 3, 4, 8]"))
    verdict_of.cache_clear()
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    assert count_checks[first:] and set(count_checks[first:]) == {"broadcast"}


def test_a_checker_change_invalidates_remembered_verdicts(monkeypatch, specs, tmp_path, count_checks):
    out = tmp_path / "pkg"
    assert cli.main(["generate", str(specs / "reduce_bf16.yaml"), "-o", str(out), "--no-build"]) == 0
    n = len(count_checks)
    verdict_of.cache_clear()
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
    ("a_file", "exists and is not a folder"),
    ("a_file/pkg", "a_file is a file, so no folder can be made below it"),
    ("class", "'class' is a Python keyword, so `import class` could not load the package"),
    ("os", "'os' is the name of a module it would shadow"),
    ("tilegen", "'tilegen' is the name of a module it would shadow"),
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


def test_plan_refuses_a_world_size_the_spec_lacks_at_its_line(root, capsys):
    assert cli.main(["plan", str(root / "specs/allgather_bf16.yaml"), "--world", "16"]) == 1
    assert "specs/allgather_bf16.yaml:7:1: world_sizes: allgather_bf16 was specified for world sizes [2, 4, 8], " \
           "not 16" in capsys.readouterr().err
    for bad in (["--world", "0"], ["--bytes", "-5"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["plan", str(root / "specs/allgather_bf16.yaml"), *bad])
        assert e.value.code == 2
        assert f"argument {bad[0]}: expected a positive integer, got {bad[1]}" in capsys.readouterr().err


def test_plan_of_a_folder_plans_every_spec_in_it_and_below(root, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    shutil.copy(root / "specs/allgather_bf16.yaml", tmp_path)
    shutil.copy(root / "specs/broadcast_f32.yaml", tmp_path / "sub")
    assert cli.main(["plan", str(tmp_path), "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert "op allgather_bf16" in out and "op broadcast_f32" in out
    assert cli.main(["validate", str(tmp_path)]) == 0
    assert "broadcast_f32" in capsys.readouterr().out  # validate finds the subfolder's spec too
    assert cli.main(["plan", str(tmp_path), "--svg", str(tmp_path / "x.svg")]) == 1
    assert "--svg draws one spec's schedule; 2 specs were found" in capsys.readouterr().err


def test_list_prints_whole_names_as_a_table_plain_lines_or_json(root, tmp_path, capsys):
    import json
    assert cli.main(["list", str(tmp_path / "nonexistent")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["list", str(tmp_path)]) == 1
    assert "no generated ops here" in capsys.readouterr().err
    ops = sorted(p.parent.name for p in (root / "generated").glob("*/manifest.json"))
    assert cli.main(["list", str(root / "generated")]) == 0  # not a terminal: plain, one op a line
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines[1:]] == ops and all(line.count("\t") == 4 for line in lines)
    assert cli.main(["list", str(root / "generated"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["op"] for r in rows] == ops and {"kind", "dtype", "schedules", "spec_hash", "archs"} <= set(rows[0])
    assert cli.main(["list", str(root / "generated"), "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert all(op in table for op in ops)  # names are never folded, whatever the width


def test_no_command_version_and_help_with_defaults(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "usage: tilegen" in err and "generate" in err and "required" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tilegen 0.")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SPEC [SPEC ...]" in text and "spec files (.yaml, .yml, .py) or folders of them" in text
    assert "(default: generated)" in text and "parallel compile jobs" in text


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
    from tilegen.moe import check as moe_check
    monkeypatch.setattr(moe_check, "moe_problems", lambda w, e, k, mode: ("seed 1: rank 0: rows written twice [3]",))
    assert cli.main(["plan", str(root / "specs/moe_bf16.yaml"), "--world", "2"]) == 1
    assert "FAILED\n  seed 1: rank 0: rows written twice [3]" in capsys.readouterr().out


def test_bench_times_collectives_and_names_the_benchmark_of_the_others(monkeypatch):
    from tilegen import bench
    ops = {n: type("Op", (), {"kind": k})() for n, k in
           (("ar", "allreduce"), ("moe_x", "moe"), ("ag_x", "ag_gemm"), ("ag", "allgather"))}
    fake = type("Pkg", (), dict(ops, OPS=list(ops)))
    monkeypatch.setattr(bench.importlib, "import_module", lambda name: fake)
    assert [op.kind for op in bench.resolve("pkg:*")] == ["allreduce", "allgather"]
    with pytest.raises(ValueError, match="times collectives, not a moe op: time op.dispatch and op.combine"):
        bench.resolve("pkg:moe_x")
    with pytest.raises(ValueError, match=r"times collectives, not an ag_gemm op: time op\(a, b\) in your model"):
        bench.resolve("pkg:ag_x")


GOOD_PY = "SPEC = dict(name='{name}', op='allgather', dtype='f32', world_sizes=[2], shape=[8])\n"
BAD_YAML = "name: bad\nop: allgather\ndtype: bf17\nworld_sizes: [2]\nshape: [8]\n"


@pytest.mark.parametrize("body, line, message", [
    ("import sys\nsys.exit(0)\n", 2, "<python>: the config called sys.exit(0)"),
    ("raise SystemExit('bye')\n", 1, "<python>: the config called sys.exit('bye')"),
    ("import os\nos._exit(0)\n", 1, "<python>: the config ended the process (exit status 0) before defining SPEC"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", 1,
     "<python>: the config ended the process (exit status -9)"),
    ("while True:\n    pass\n", 1, "<python>: the config ran for 1 s without finishing (an endless loop?"),
])
def test_a_config_that_ends_the_process_or_never_ends_is_a_located_error(tmp_path, capsys, monkeypatch, body, line,
                                                                          message):
    """Whatever a Python config does, validate/generate/--check report it at that file and still check
    the others: a CI gate on `generate --check` cannot pass vacuously."""
    monkeypatch.setenv("TILEGEN_CONFIG_TIMEOUT_S", "1")
    (tmp_path / "ends.py").write_text(body + GOOD_PY.format(name="ends"))
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "good.py").write_text(GOOD_PY.format(name="good"))
    for cmd in (["validate"], ["generate", "--no-build", "-o", str(tmp_path / "pkg")],
                ["generate", "--check", "-o", str(tmp_path / "pkg")]):
        assert cli.main([cmd[0], str(tmp_path), *cmd[1:]]) == 1
        err = capsys.readouterr().err
        assert f"ends.py:{line}:1: {message}" in err, err
        assert "bad.yaml:3:8: dtype:" in err and "good.py" not in err
    assert not (tmp_path / "pkg").exists()


def test_a_bad_timeout_setting_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TILEGEN_CONFIG_TIMEOUT_S", "soon")
    (tmp_path / "good.py").write_text(GOOD_PY.format(name="good"))
    assert cli.main(["validate", str(tmp_path)]) == 1
    assert "TILEGEN_CONFIG_TIMEOUT_S:1:1: expected a positive number of seconds, got 'soon'" in capsys.readouterr().err


def test_ctrl_c_while_a_config_runs_is_one_line_and_stops_it(tmp_path):
    import signal
    marker = tmp_path / "still-running"
    (tmp_path / "slow.py").write_text(
        f"import time\nfor _ in range(600):\n    time.sleep(0.1)\nopen({str(marker)!r}, 'w')\n"
        + GOOD_PY.format(name="slow"))
    # SIGINT handled as a terminal's Ctrl-C is (a test run started in the background inherits it ignored)
    p = subprocess.Popen([sys.executable, "-m", "tilegen.cli", "validate", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = p.stderr.readline()  # said after 2 s: which file runs
    assert f"tilegen: running {tmp_path / 'slow.py'} (a Python config; stopped after 60 s)" in line
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "tilegen: interrupted" and "Traceback" not in err
    time.sleep(1)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["load", "os", "sys", "init", "ops", "tilegen", "json"])
def test_op_names_the_package_could_not_import_are_refused(tmp_path, capsys, name):
    y = tmp_path / f"{name}.yaml"
    y.write_text(f"op: allgather\ndtype: f32\nname: {name}\nworld_sizes: [2]\nshape: [8]\n")
    assert cli.main(["validate", str(y)]) == 1
    err = capsys.readouterr().err
    assert f"{name}.yaml:3:7: name: {name!r} is " in err and "could not be imported from its package" in err


def test_os_errors_are_one_line(specs, tmp_path, capsys, monkeypatch):
    """A folder that cannot be written (root passes os.access, so the OS's own refusal is faked here
    too) and an OS error anywhere in a command: one line, no traceback."""
    import os
    from pathlib import Path
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert cli.main(["generate", str(specs), "-o", str(tmp_path / "pkg"), "--no-build"]) == 1
    assert f"-o {tmp_path / 'pkg'}: cannot write in {tmp_path} (permission denied)" in capsys.readouterr().err
    monkeypatch.undo()

    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    assert cli.main(["generate", str(specs), "-o", str(tmp_path / "pkg"), "--no-build"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: Permission denied: {tmp_path / 'pkg'}" and "Traceback" not in err


@pytest.mark.parametrize("cmd", [["bench", "generated:allreduce_bf16"], ["tune", "specs/allreduce_bf16.yaml"]])
def test_bench_and_tune_without_torch_say_so(monkeypatch, capsys, cmd):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert cli.main(cmd) == 1
    err = capsys.readouterr().err
    assert f"error: tilegen {cmd[0]} times ops on GPUs and needs torch: pip install torch" in err


def test_bad_archs_or_a_missing_nvcc_leave_the_package_untouched(specs, tmp_path, capsys):
    import os
    out = tmp_path / "pkg"
    assert cli.main(["generate", str(specs), "-o", str(out), "--no-build"]) == 0
    init = out / "__init__.py"
    before = init.stat().st_mtime_ns
    y = specs / "reduce_bf16.yaml"
    y.write_text(y.read_text().replace("world_sizes: [2, 4, 8]", "world_sizes: [2, 4]"))
    capsys.readouterr()
    assert cli.main(["generate", str(specs), "-o", str(out), "--archs", "sm_bogus"]) == 1
    assert "--archs: expected GPU archs like sm_90a,sm_100a, got 'sm_bogus'" in capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "nvcc")))
    r = subprocess.run([sys.executable, "-m", "tilegen.cli", "generate", str(specs), "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "error: nvcc not found on PATH" in r.stderr and "Traceback" not in r.stderr
    manifest = (out / "reduce_bf16" / "manifest.json").read_text()
    assert init.stat().st_mtime_ns == before and '"world_sizes": [\n      2,\n      4,\n      8\n' in manifest


CE_SPEC = ("name: agce\nop: ag_gemm\ndtype: bf16\nworld_sizes: [2]\nshape: [{name: m, max: 1024}, 512]\nn: 256\n"
           "overlap: copy_engine\n")


def test_a_no_op_generate_re_checks_and_re_renders_nothing(tmp_path, monkeypatch, capsys):
    """Copy-engine programs and MoE layouts are remembered like schedules (they were re-checked on
    every run: ~20 CPU-s per copy-engine op), and an op whose inputs did not change is read back."""
    from tilegen.core import render as codegen
    from tilegen.moe import check as moe_check
    from tilegen.overlap import check as ce_check
    calls = {"ce": 0, "moe": 0, "render": 0}

    def counted(name, real):
        def f(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        return f
    monkeypatch.setattr(ce_check, "check_copy_engine", counted("ce", ce_check.check_copy_engine))
    monkeypatch.setattr(moe_check, "moe_problems", counted("moe", moe_check.moe_problems))
    monkeypatch.setattr(pipeline, "render_op", counted("render", codegen.render_op))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "agce.yaml").write_text(CE_SPEC)
    moe = "name: moe2\nop: moe\ndtype: bf16\nworld_sizes: [2]\nshape: [{name: tokens, max: 64}, 256]\n" \
          "experts: 8\ntopk: 2\n"
    (tmp_path / "s" / "moe2.yaml").write_text(moe)
    out = tmp_path / "pkg"
    ce_check.copy_engine_verdict.cache_clear()
    assert cli.main(["generate", str(tmp_path / "s"), "-o", str(out), "--no-build"]) == 0
    assert calls == {"ce": 1, "moe": 1, "render": 2}
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    ce_check.copy_engine_verdict.cache_clear()
    assert cli.main(["generate", str(tmp_path / "s"), "-o", str(out), "--no-build"]) == 0
    assert cli.main(["generate", str(tmp_path / "s"), "-o", str(out), "--check"]) == 0
    assert calls == {"ce": 1, "moe": 1, "render": 2}, "a no-op generate checked or rendered again"
    # a generated file edited by hand is not served from the cache: the op is made again and restored
    (out / "agce" / "op.py").write_text("# edited\n")
    assert cli.main(["generate", str(tmp_path / "s"), "-o", str(out), "--check"]) == 1
    assert cli.main(["generate", str(tmp_path / "s"), "-o", str(out), "--no-build"]) == 0
    assert calls["render"] == 4 and calls["ce"] == 1  # rendered again; the verdict still remembered
    assert {p: p.read_bytes() for p in first} == first
    assert oct((out / cli.VERDICTS).stat().st_mode & 0o777) == "0o644"


def test_remembered_verdicts_are_keyed_on_every_module_the_checks_read(tmp_path, monkeypatch):
    """A change to the op registry's expectations, the layout or the schedules (not only check.py)
    must miss the cache: the key hashes every tilegen module the checkers import, found by reading
    their imports."""
    mods = pipeline.semantic_modules()
    assert {"collective.check", "overlap.ce_program", "overlap.check", "moe.check", "collective.ops",
            "collective.layout", "collective.schedules", "collective.ir", "core.verdict"} <= set(mods)
    assert "core.render" not in mods and "cli" not in mods
    copy = tmp_path / "tilegen"
    shutil.copytree(pipeline.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "PACKAGE_DIR", copy)
    pipeline.checker_version.cache_clear()
    try:
        before = pipeline.checker_version()
        from tilegen.collective.ops import make_schedule
        s = make_schedule("allgather", "direct", 2, "per_tile")
        question = f"schedule|allgather|None|{s!r}"
        key = pipeline.VerdictCache.key(question)
        reg = copy / "collective" / "ops.py"
        reg.write_text(reg.read_text().replace("def expected_output(", "def expected_output(  # changed\n", 1))
        pipeline.checker_version.cache_clear()
        assert pipeline.checker_version() != before
        assert pipeline.VerdictCache.key(question) != key
        # what the family asks the checker (verdict_of: the compute orders, the SMs) counts too
        changed = pipeline.checker_version()
        chk = copy / "collective" / "check.py"
        chk.write_text(chk.read_text().replace("orders = tuple(compute_order(op, s, r)",
                                               "orders = tuple(compute_order(op, s, r )"))
        pipeline.checker_version.cache_clear()
        assert pipeline.checker_version() != changed
    finally:
        pipeline.checker_version.cache_clear()


def test_a_config_spec_that_cannot_leave_the_child_is_still_checked_field_by_field(tmp_path, capsys):
    (tmp_path / "f.py").write_text("SPEC = dict(name='f', op='allgather', dtype='bf16', world_sizes=[2], shape=[8],\n"
                                   "            ctas=lambda: 1)\n")
    (tmp_path / "n.py").write_text("SPEC = 5\n")
    assert cli.main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "f.py:2:18: ctas: Input should be a valid integer, or 'auto' (got <function <lambda>" in err
    assert "n.py:1:1: SPEC: expected a KernelSpec or a dict, got int" in err
