"""docs/measurements.md is generated from docs/data/runs.json and the data files it lists
(tools/report_measurements.py): the provenance covers every data file, its entries are well formed, and the
committed reference is what the generator writes, byte for byte, every time."""

import importlib.util
import json
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data"
SCRIPT = ROOT / "tools" / "report_measurements.py"

FIELDS = {
    "file": (str,), "family": (str,), "what": (str,), "date": (str,), "commit": (str, type(None)),
    "machine": (str,), "cards": (str,), "world": (int,), "driver": (str, type(None)),
    "nccl": (str, type(None)), "torch": (str, type(None)), "command": (str, type(None)), "section": (str,),
}
FAMILIES = {"collective", "overlap", "moe", "host", "probe"}


def runs() -> list[dict]:
    return json.loads((DATA / "runs.json").read_text())


def generator():
    spec = importlib.util.spec_from_file_location("report_measurements", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_data_file_is_listed_and_every_listed_file_exists():
    on_disk = {p.name + ("/" if p.is_dir() else "") for p in DATA.iterdir() if p.name != "runs.json"}
    listed = [r["file"] for r in runs()]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert on_disk - set(listed) == set(), "data files missing from docs/data/runs.json"
    for name in listed:
        path = DATA / name
        assert path.exists(), f"{name} is listed but does not exist"
        assert path.is_dir() == name.endswith("/"), f"{name}: a folder is listed with a trailing '/', a file without"


def test_entries_have_every_field_with_the_right_type():
    log = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "log").glob("*.md")))
    headings = {m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", log, re.M)}
    for r in runs():
        assert set(r) == set(FIELDS), f"{r.get('file')}: fields {sorted(set(r) ^ set(FIELDS))}"
        for field, types in FIELDS.items():
            assert isinstance(r[field], types) and not isinstance(r[field], bool), f"{r['file']}: {field}"
        assert r["family"] in FAMILIES, r["file"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["date"]), r["file"]
        date.fromisoformat(r["date"])
        assert r["commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}", r["commit"]), r["file"]
        assert r["world"] >= 1, r["file"]
        for part in r["section"].split(" > "):
            assert part in headings, f"{r['file']}: section {part!r} is not a heading of docs/log/"


def test_committed_reference_is_current():
    res = subprocess.run([sys.executable, "tools/report_measurements.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_generator_is_deterministic(tmp_path):
    mod = generator()
    first, second = mod.render(), mod.render()
    assert first == second
    outs = []
    for name in ("a.md", "b.md"):
        out = tmp_path / name
        assert mod.main(["--out", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == first.encode()
    assert (ROOT / "docs" / "measurements.md").read_bytes() == first.encode()


def test_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "measurements.md"
    stale.write_text("# Measurements\n")
    assert generator().main(["--check", "--out", str(stale)]) == 1
