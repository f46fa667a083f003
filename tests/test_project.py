"""[tool.tilegen] in a downstream project's pyproject.toml (tilegen.core.project, tilegen.build_backend)."""
import pytest

from tilegen.core.project import ProjectError, read_config


def _pyproject(tmp_path, table: str):
    (tmp_path / "specs").mkdir(exist_ok=True)
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nname = "x"\nversion = "0"\n\n' + table)
    return p


def test_the_example_project_config_reads(root):
    cfg = read_config(root / "examples" / "downstream" / "pyproject.toml")
    assert cfg.specs == ("specs/",) and cfg.package == "tp_ops" and cfg.package_name == "tp_ops"
    assert cfg.archs == ("sm_90a", "sm_100a") and cfg.calibration == "auto"


def test_no_table_is_no_tilegen(tmp_path):
    assert read_config(_pyproject(tmp_path, "")) is None


@pytest.mark.parametrize("table, message", [
    ('specs = "specs/"\npackage = "ops"', r"\[tool.tilegen\].specs: expected a list"),
    ('specs = ["nope/"]\npackage = "ops"', r"specs: nope/ does not exist"),
    ('specs = ["specs/"]\npackage = "my-ops"', r"package: expected the folder of a top-level package"),
    ('specs = ["specs/"]\npackage = "ops"\narchs = ["90"]', r"archs: expected GPU archs like"),
    ('specs = ["specs/"]\npackage = "ops"\njobs = 0', r"jobs: expected a positive number"),
    ('specs = ["specs/"]\npackage = "ops"\nspec = 1', r"unknown key\(s\) spec"),
])
def test_bad_config_is_a_clear_error_naming_the_key(tmp_path, table, message):
    with pytest.raises(ProjectError, match=message):
        read_config(_pyproject(tmp_path, "[tool.tilegen]\n" + table))


def test_src_layout_package(tmp_path):
    cfg = read_config(_pyproject(tmp_path, '[tool.tilegen]\nspecs = ["specs/"]\npackage = "src/my_ops"\n'))
    assert cfg.package_name == "my_ops"


def test_backend_exposes_the_pep517_interface():
    import tilegen.build_backend as b
    for name in ("build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
                 "prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
        assert callable(getattr(b, name)), name


def _clean_example(root, tmp_path, small: bool = True):
    """A clean copy of examples/downstream; small: its specs replaced by one small allgather (the
    hooks' behaviour does not depend on them, and checking the example's three takes ~12 s)."""
    import shutil
    proj = tmp_path / "downstream"
    shutil.copytree(root / "examples" / "downstream", proj,
                    ignore=shutil.ignore_patterns("tp_ops", "build", "dist", "*.egg-info"))
    if small:
        for f in (proj / "specs").iterdir():
            f.unlink()
        (proj / "specs" / "ag.yaml").write_text("name: ag\nop: allgather\ndtype: bf16\nworld_sizes: [2]\n"
                                                "shape: [{name: m, max: 64}, 256]\n")
    return proj


@pytest.mark.parametrize("hook", ["get_requires_for_build_wheel", "get_requires_for_build_editable",
                                  "get_requires_for_build_sdist", "prepare_metadata_for_build_wheel"])
def test_every_hook_pip_may_call_first_finds_the_ops_package(root, tmp_path, hook):
    """Under build isolation (pip's default) the first hook is get_requires_for_build_wheel, whose
    setuptools egg_info step needs the ops package: each hook writes its sources first (no build)."""
    import subprocess
    import sys
    proj = _clean_example(root, tmp_path)
    arg = f"{str(tmp_path / 'meta')!r}" if hook.startswith("prepare") else ""
    (tmp_path / "meta").mkdir()
    code = f"import tilegen.build_backend as b; print(b.{hook}({arg}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=proj, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (proj / "tp_ops" / "__init__.py").exists() and (proj / "tp_ops" / "ag" / "op.py").exists()
    assert not (proj / "tp_ops" / "ag" / "_build").exists()  # sources only: the build is build_wheel's


def test_the_sdist_carries_the_specs_a_wheel_is_generated_from(root, tmp_path):
    import subprocess
    import sys
    import tarfile
    proj = _clean_example(root, tmp_path, small=False)
    for f in (proj / "specs").iterdir():  # the same spec files, made small (their names are what is checked)
        f.write_text(f"name: {f.stem}_op\nop: allgather\ndtype: bf16\nworld_sizes: [2]\nshape: [8]\n")
    code = f"import tilegen.build_backend as b; print(b.build_sdist({str(tmp_path / 'sd')!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=proj, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    names = tarfile.open(tmp_path / "sd" / r.stdout.strip().splitlines()[-1]).getnames()
    for spec in ("allreduce.yaml", "mlp_down.yaml", "mlp_gate_up.yaml"):
        assert f"tp_app-0.1.0/specs/{spec}" in names
    assert "tp_app-0.1.0/pyproject.toml" in names and "tp_app-0.1.0/tp_app/__main__.py" in names


def test_the_example_readme_gives_the_commands_the_tests_run(root):
    """examples/downstream/README.md carries the commands a user types; the slow test runs the same."""
    text = (root / "examples" / "downstream" / "README.md").read_text()
    for cmd in ("python3 -m pip wheel --no-deps -w wheels .",
                "python3 -m pip wheel --no-deps --find-links wheels -w dist examples/downstream",
                "python3 -m pip install --find-links wheels dist/tp_app-0.1.0-py3-none-linux_x86_64.whl",
                "torchrun --nproc-per-node 2 -m tp_app"):
        assert cmd in text, cmd
