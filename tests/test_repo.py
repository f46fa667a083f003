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
    import importlib.util
    ruff = shutil.which("ruff")
    if ruff is None and importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in the [test] extra)")
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


def _run(*cmd, **kw):
    import subprocess
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def tilegen_wheel(tmp_path_factory):
    """tilegen's wheel, built as examples/downstream/README.md says (pip wheel --no-deps -w wheels .),
    from a copy of what it packs: building in the checkout would leave build/ and *.egg-info there."""
    import shutil
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    src = tmp_path_factory.mktemp("tilegen-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "tilegen", src / "tilegen", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path_factory.mktemp("wheels")
    r = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), ".", cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    return next(wheels.glob("tilegen-*.whl"))


def _venv_with(tmp_path, wheel):
    """A fresh venv whose dependencies come from this interpreter's site-packages, with `wheel` in it."""
    import sys
    venv = tmp_path / "venv"
    r = _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    assert r.returncode == 0, r.stdout + r.stderr
    py = venv / "bin" / "python"
    site = _run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    r = _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    return venv, py, site


def _checkout_state(root):
    return sorted(p.name for p in root.iterdir() if p.name == "build" or p.name.endswith(".egg-info"))


@pytest.mark.slow
@pytest.mark.nvcc
def test_the_wheel_installs_and_generates_an_op(root, tmp_path, tilegen_wheel):
    """tilegen as users install it (a wheel, not this checkout): templates and headers are package
    data, and `tilegen generate` renders and builds a spec from the installed package."""
    import shutil
    import zipfile
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    names = zipfile.ZipFile(tilegen_wheel).namelist()
    assert {"tilegen/collective/templates/collective.cu.j2", "tilegen/core/templates/package_init.py.j2"} <= set(names)
    assert "tilegen/include/tilegen/collective/kernel.cuh" in names and "tilegen/include/tilegen/moe/host.cuh" in names
    venv, py, _ = _venv_with(tmp_path, tilegen_wheel)
    (venv / "bin" / "tilegen").write_text(f"#!{py}\nimport sys\nfrom tilegen.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "tilegen").chmod(0o755)
    r = _run(str(py), "-c", "import tilegen, sys; print(tilegen.__file__)", cwd=tmp_path)
    assert r.stdout.startswith(str(venv)), r.stdout + r.stderr  # the installed copy, not the checkout
    spec = tmp_path / "ag.yaml"
    spec.write_text("name: ag\nop: allgather\ndtype: bf16\nworld_sizes: [2]\nshape: [{name: m, max: 64}, 256]\n")
    r = _run(str(venv / "bin" / "tilegen"), "generate", str(spec), "-o", str(tmp_path / "pkg"), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "pkg" / "ag" / "_build" / "libtilegen_ag.so").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.nvcc
def test_a_downstream_project_builds_a_wheel_of_prebuilt_ops(root, tmp_path, tilegen_wheel):
    """examples/downstream as its README builds it: `pip wheel` under pip's default build isolation,
    tilegen found through --find-links, runs tilegen through its build backend; the wheel holds every
    op's library for both archs with its provenance; a second build (a new isolated environment)
    rebuilds nothing; installed in a fresh venv on a PATH without nvcc, the ops import and describe
    themselves. Nothing is left in the checkout."""
    import json
    import shutil
    import sys
    import time
    import zipfile
    from pathlib import Path
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    before_state = _checkout_state(root)
    proj = tmp_path / "downstream"
    shutil.copytree(root / "examples" / "downstream", proj,
                    ignore=shutil.ignore_patterns("tp_ops", "build", "dist", "*.egg-info"))
    wheel_cmd = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--find-links", str(tilegen_wheel.parent),
                 "-w", str(tmp_path / "dist"), str(proj))
    r = _run(*wheel_cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "dist").glob("tp_app-*.whl"))
    assert wheel.name == "tp_app-0.1.0-py3-none-linux_x86_64.whl"  # platform-specific, any CPython 3
    names = set(zipfile.ZipFile(wheel).namelist())
    ops = ("allreduce_bf16", "mlp_gate_up", "mlp_down")
    for op in ops:
        assert {f"tp_ops/{op}/_build/libtilegen_{op}.so", f"tp_ops/{op}/_build/build.json",
                f"tp_ops/{op}/manifest.json", f"tp_ops/{op}/op.py"} <= names
    assert not any(n.endswith((".o", ".d", "build.ninja")) for n in names)
    libs = {op: proj / "tp_ops" / op / "_build" / f"libtilegen_{op}.so" for op in ops}
    before = {op: p.stat().st_mtime_ns for op, p in libs.items()}
    t0 = time.monotonic()
    r = _run(*wheel_cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {op: p.stat().st_mtime_ns for op, p in libs.items()} == before, "the second build rebuilt a library"
    print(f"second isolated build: {time.monotonic() - t0:.1f} s")

    venv, py, site = _venv_with(tmp_path, wheel)
    code = (
        "import json, tp_ops, tp_app\n"
        "from tilegen.core.runtime import OpLoadError, check_build\n"
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
    r = _run(str(py), "-c", code, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    prov = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(prov) == set(ops)
    assert all(p["archs"] == ["sm_90a", "sm_100a"] and p["tilegen"] for p in prov.values())
    assert _checkout_state(root) == before_state


def test_the_readme_shows_the_spec_file_it_names(root):
    """README's tutorial shows specs/allgather_bf16.yaml verbatim (it had drifted from the file)."""
    import re
    import textwrap
    readme = (root / "README.md").read_text()
    block = re.search(r"`specs/allgather_bf16.yaml`.*?```yaml\n(.*?)```", readme, re.S).group(1)
    assert textwrap.dedent(block) == (root / "specs" / "allgather_bf16.yaml").read_text()


def test_each_dependency_is_listed_once(root):
    import re
    import tomllib
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps]
    assert len(names) == len(set(names)), names


def test_gpu_tests_run_in_the_order_named_not_by_file_name(root):
    """Every rank must run the GPU tests in one order, the bounded-wait ones last: tests/gpu/conftest.py
    names it (it used to follow from a file called test_zz_...)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_conftest", root / "tests/gpu/conftest.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    on_disk = {p.stem for p in (root / "tests/gpu").glob("test_*.py")}
    assert on_disk == set(conf.GPU_ORDER), "name every GPU test module in GPU_ORDER"
    item = type("Item", (), {})

    def at(name, i):
        it = item()
        it.fspath, it.i = root / "tests/gpu" / f"{name}.py", i
        return it
    items = [at("test_timeout_gpu", 0), at("test_new_gpu", 1), at("test_moe_gpu", 2), at("test_allgather_gpu", 3),
             at("test_timeout_gpu", 4)]
    assert [(it.fspath.stem, it.i) for it in conf.gpu_order(items)] == [
        ("test_allgather_gpu", 3), ("test_moe_gpu", 2), ("test_new_gpu", 1), ("test_timeout_gpu", 0),
        ("test_timeout_gpu", 4)]


KEYWORDS = {"if", "while", "for", "switch", "return", "sizeof"}


def unused_wait_bounds(text: str) -> list[str]:
    """Functions of C++ source that take a wait bound (a parameter named timeout_ns) and never read it."""
    found = []
    for m in re.finditer(r"\b(\w+)\s*\(([^;{)]*\btimeout_ns\b[^;{)]*)\)\s*(?:const\s*)?\{", text):
        if m.group(1) in KEYWORDS:
            continue
        i, depth = m.end(), 1
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if not re.search(r"\btimeout_ns\b", text[m.end():i]):
            found.append(m.group(1))
    return found


def test_every_library_function_given_a_wait_bound_uses_it(root):
    """A host entry that takes the call's timeout_ns and drops it turns a bounded call into a hang (a
    collective host run() that built its Params without the WaitCtx made the bounded-wait GPU test hang)."""
    lib = root / "tilegen" / "include"
    for f in sorted(lib.rglob("*.cuh")) + sorted(lib.rglob("*.h")):
        assert not unused_wait_bounds(f.read_text()), f"{f.relative_to(lib)}: {unused_wait_bounds(f.read_text())}"
    # the check sees the bug it is for: run() without its WaitCtx
    host = (lib / "tilegen" / "collective" / "host.cuh").read_text()
    assert unused_wait_bounds(host.replace("    p.wait = wait_ctx(timeout_ns);\n", "")) == ["run"]


def test_settings_are_read_in_one_module_and_listed_in_the_readme(root):
    """Every TILEGEN_* variable the package reads goes through tilegen.settings (C++ reads none), and
    README's table is the module's."""
    from tilegen import settings

    readers = re.compile(r"(os\.environ(\.get)?[\[(]|getenv\()\s*['\"]TILEGEN_")
    for path in sorted((root / "tilegen").rglob("*")):
        if path.suffix in (".py", ".cuh", ".h", ".cc") and path.name != "settings.py":
            assert not readers.search(path.read_text()), f"{path} reads a TILEGEN_ variable itself"
    named = set(re.findall(r"\bTILEGEN_[A-Z_]+\b", "\n".join(
        p.read_text() for p in (root / "tilegen").rglob("*.py") if p.name != "settings.py")))
    assert named - set(settings.SETTINGS) <= {"TILEGEN_NO_NVSHMEM"}, named - set(settings.SETTINGS)  # (a -D flag)
    assert settings.table() in (root / "README.md").read_text()


def test_a_malformed_setting_names_the_variable(monkeypatch):
    from tilegen import settings

    for name, bad, expects in (("TILEGEN_GEMM_SMS", "-3", "a number of CTAs"), ("TILEGEN_CE_MEMOPS", "yes", "0 or 1"),
                               ("TILEGEN_WAIT_TIMEOUT_MS", "soon", "a number of milliseconds")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name} must be {expects}"):
            settings.get(name)
    monkeypatch.setenv("TILEGEN_CE_MEMOPS", "0")
    assert settings.get("TILEGEN_CE_MEMOPS") is False
    monkeypatch.delenv("TILEGEN_GEMM_SMS")
    assert settings.get("TILEGEN_GEMM_SMS") == 0
