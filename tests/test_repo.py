"""Repository hygiene: README's set-up commands are the ones CI runs, lint, imports, the wheel."""
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
