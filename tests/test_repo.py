"""Repository hygiene: README's set-up commands are the ones CI runs, lint, imports, the wheel."""
import os
import re

import pytest


def test_ci_runs_the_readme_commands(root):
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"## Set up\n.*?```sh\n(.*?)\n```.*?```sh\n(.*?)\n```", readme, re.S)
    assert blocks, "README must have the install and test commands under '## Set up'"
    install, tests = blocks[0]
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci


def test_python_sources_pass_ruff(root):
    """Line length <= 120 and pyflakes/pycodestyle clean (pyproject's [tool.ruff])."""
    import shutil
    import subprocess
    import sys
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    r = subprocess.run(cmd + ["check", "tilegen", "tests", "tools", "examples"], cwd=root, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_generated_op_imports_without_the_spec_machinery(root):
    """Deployed apps import generated ops: that must not need pydantic or ruamel (the build does)."""
    import subprocess
    import sys
    code = ("import sys; import generated.allgather_bf16.op, generated.ag_gemm_bf16.op; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'ruamel', 'jinja2')); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.nvcc
def test_the_nvlink_store_probe_compiles(root, tmp_path):
    """tools/probe_nvlink_stores.cu (gpu_check.sh probe: the push's NVLink ceiling) builds with the flags
    the phase uses (PROBE_NVCC_FLAGS, read from the script), so the phase does not first fail there."""
    import re
    import shlex
    import shutil
    import subprocess
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    flags = re.search(r'^PROBE_NVCC_FLAGS="([^"]+)"', (root / "tools" / "gpu_check.sh").read_text(), re.M)
    assert flags, "tools/gpu_check.sh defines PROBE_NVCC_FLAGS"
    r = subprocess.run(["nvcc", *shlex.split(flags.group(1)),
                        str(root / "tools" / "probe_nvlink_stores.cu"), "-o", str(tmp_path / "probe")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "probe").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.nvcc
def test_the_wheel_installs_and_generates_an_op(root, tmp_path):
    """tilegen as users install it (a wheel, not this checkout): templates and headers are package
    data, and `tilegen generate` renders and builds a spec from the installed package."""
    import shutil
    import subprocess
    import sys
    import zipfile
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, **kw)  # noqa: E731
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
            str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "dist").glob("tilegen-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tilegen/templates/collective.cu.j2" in names and "tilegen/include/tilegen/collective.cuh" in names
    venv = tmp_path / "venv"  # fresh; the dependencies come from this interpreter's site-packages
    r = run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    assert r.returncode == 0, r.stdout + r.stderr
    py = venv / "bin" / "python"
    site = run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    r = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    (venv / "bin" / "tilegen").write_text(f"#!{py}\nimport sys\nfrom tilegen.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "tilegen").chmod(0o755)
    r = run(str(py), "-c", "import tilegen, sys; print(tilegen.__file__)", cwd=tmp_path)
    assert r.stdout.startswith(str(venv)), r.stdout + r.stderr  # the installed copy, not the checkout
    spec = tmp_path / "ag.yaml"
    spec.write_text("name: ag\nop: allgather\ndtype: bf16\nworld_sizes: [2]\nshape: [{name: m, max: 64}, 256]\n")
    r = run(str(venv / "bin" / "tilegen"), "generate", str(spec), "-o", str(tmp_path / "pkg"), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "pkg" / "ag" / "_build" / "libtilegen_ag.so").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.nvcc
def test_a_downstream_project_builds_a_wheel_of_prebuilt_ops(root, tmp_path):
    """examples/downstream as its users build it: `pip wheel .` runs tilegen through its build backend;
    the wheel holds every op's library for both archs with its provenance; a second build rebuilds
    nothing; installed in a fresh venv on a PATH without nvcc, the ops import and describe themselves."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import time
    import zipfile
    from pathlib import Path
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, **kw)  # noqa: E731
    proj = tmp_path / "downstream"
    shutil.copytree(root / "examples" / "downstream", proj,
                    ignore=shutil.ignore_patterns("tp_ops", "build", "*.egg-info"))
    wheel_cmd = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-w", str(tmp_path / "dist"), str(proj))
    r = run(*wheel_cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "dist").glob("tp_app-*.whl"))
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl")  # platform-specific, any CPython 3
    names = set(zipfile.ZipFile(wheel).namelist())
    ops = ("allreduce_bf16", "mlp_gate_up", "mlp_down")
    for op in ops:
        assert {f"tp_ops/{op}/_build/libtilegen_{op}.so", f"tp_ops/{op}/_build/build.json",
                f"tp_ops/{op}/manifest.json", f"tp_ops/{op}/op.py"} <= names
    assert not any(n.endswith((".o", ".d", "build.ninja")) for n in names)
    libs = {op: proj / "tp_ops" / op / "_build" / f"libtilegen_{op}.so" for op in ops}
    before = {op: p.stat().st_mtime_ns for op, p in libs.items()}
    t0 = time.monotonic()
    r = run(*wheel_cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {op: p.stat().st_mtime_ns for op, p in libs.items()} == before, "the second build rebuilt a library"
    assert time.monotonic() - t0 < 60

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)).returncode == 0
    py = venv / "bin" / "python"
    site = run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    r = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    code = (
        "import json, tp_ops, tp_app\n"
        "from tilegen.runtime import OpLoadError, check_build\n"
        "assert tp_ops.__file__.startswith(%r), tp_ops.__file__\n"
        "prov = tp_app.provenance()\n"
        "print(json.dumps(prov, sort_keys=True))\n"
        "op = tp_ops.allreduce_bf16\n"
        "assert check_build(op.directory, op.name, prov['allreduce_bf16']['nvshmem'], 'sm_100').exists()\n"
        "try:\n"
        "    check_build(op.directory, op.name, None, 'sm_80')\n"
        "    raise SystemExit('sm_80 accepted')\n"
        "except OpLoadError as e:\n"
        "    assert 'holds GPU code for sm_90a, sm_100a only, but this GPU is sm_80' in str(e), e\n"
    ) % site
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "nvcc").exists())
    r = run(str(py), "-c", code, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    prov = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(prov) == set(ops)
    assert all(p["archs"] == ["sm_90a", "sm_100a"] and p["tilegen"] for p in prov.values())


def test_the_tools_spec_folders_plan_and_pass_the_checker(root):
    """The specs tools/gpu_check.sh generates on the GPU machine (bench variants, fused tile variants)
    load and their plans pass the checker here, so a device call never spends its minutes on a bad one."""
    from tilegen.pipeline import checked_plans
    from tilegen.spec import load_specs
    for folder in ("tools/bench_specs", "tools/fused_specs"):
        good, problems = load_specs([root / folder])
        assert not problems and good, (folder, problems)
        for ls in good:
            assert checked_plans(ls.spec), ls.spec.name


def test_gpu_check_ab_runs_every_side_on_its_own_build(root, tmp_path):
    """`gpu_check.sh ab` (the A/B every kernel change is judged by) runs the script on the base's build,
    each variant's, then this tree's, in turns (even rounds in reverse order, so a drift along a round
    favours no side), leaves the tree's build in place and, with AB_SUMMARY, ends with each side's
    range of one number over every rank and round. Here with stub
    nvidia-smi and torchrun: each side's `generated` says which build it is."""
    import shutil
    import subprocess
    import tarfile
    (tmp_path / "tools").mkdir()
    shutil.copy(root / "tools" / "gpu_check.sh", tmp_path / "tools")
    pre, stub = tmp_path / ".prebuilt", tmp_path / "stub"
    pre.mkdir()
    stub.mkdir()
    for side, tarball in (("base", "base.tar.xz"), ("v1", "ab_v1.tar.xz"), ("v2", "ab_v2.tar.xz"),
                          ("libs", "ops.tar.xz")):  # (ops.tar.xz: the tree's libraries, unpacked over its sources)
        src = tmp_path / f"pkg_{side}" / "generated"
        (src / "op" / "_build").mkdir(parents=True)
        (src / "op" / "_build" / "libop.so").write_text(side)
        if side != "libs":
            (src / "MARKER").write_text(side + "\n")
        with tarfile.open(pre / tarball, "w:xz") as t:
            t.add(src, arcname="generated")
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "MARKER").write_text("tree\n")
    (stub / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: stub"; echo "GPU 1: stub"\n')
    (stub / "torchrun").write_text('#!/bin/sh\necho "side sees: $(cat generated/MARKER)"\n'
                                   'echo "dispatch $(wc -c < generated/MARKER).5"\n')
    for f in stub.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               AB_ROUNDS="2", AB_SUMMARY=r"dispatch ([0-9.]+)")
    r = subprocess.run(["bash", "tools/gpu_check.sh", "ab", "2", "script.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = re.findall(r"== (\w+), round (\d)\nside sees: (\w+)", r.stdout)
    sides = ["base", "v1", "v2", "tree"]
    assert runs == [(s, "1", s) for s in sides] + [(s, "2", s) for s in reversed(sides)], r.stdout
    summary = dict(re.findall(r"^  (\w+) +(.*)$", r.stdout.split("== summary")[1], re.M))
    assert summary == {s: f"{len(s) + 1}.5 / {len(s) + 1}.5 / {len(s) + 1}.5 (2 values)" for s in sides}, r.stdout
    assert (tmp_path / "generated").is_dir() and not (tmp_path / "generated").is_symlink()
    assert (tmp_path / "generated" / "MARKER").read_text() == "tree\n"
    assert (tmp_path / "generated" / "op" / "_build" / "libop.so").read_text() == "libs"
