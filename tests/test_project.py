"""[tool.tilegen] in a downstream project's pyproject.toml (tilegen.project, tilegen.build_backend)."""
import pytest

from tilegen.project import ProjectError, read_config


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
