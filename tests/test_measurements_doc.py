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

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data"
SCRIPT = ROOT / "tools" / "report_measurements.py"

FIELDS = {
    "file": (str,), "family": (str,), "what": (str,), "date": (str,), "commit": (str, type(None)),
    "machine": (str,), "cards": (str,), "world": (int,), "driver": (str, type(None)),
    "nccl": (str, type(None)), "torch": (str, type(None)), "command": (str, type(None)), "section": (str,),
}
FAMILIES = {"collective", "overlap", "moe", "host", "probe", "hot_path", "floor"}


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


def _sizes_row(op, size, us, graph, baselines=True):
    """A row as tilegen.bench.bench_op writes it."""
    times = {op: us, **({"nccl": 30.0, "torch_symm_one_shot": 11.0, "torch_symm_two_shot": 9.0} if baselines else {})}
    return {"op": op, "kind": "allreduce", "bytes": size, "rows": size // 8192, "times_us": times,
            "times_graph_us": {op: graph, **({"nccl": 12.0, "torch_symm_two_shot": 7.5} if baselines else {})},
            "busbw_GBps": {}}


def test_the_hot_path_and_latency_floor_tables(tmp_path, monkeypatch):
    """What bench/scripts/bench_hot_path.py and probe_latency_floor.cu write becomes the reference's tables: the
    fused decode step against its unfused forms per shape, the allreduce alone by size (fast, deterministic and
    the baselines of the fast op's run side by side, the deterministic speed as a fraction of the fast), and the
    floors (launch, NVLink one-way, the minimal LL exchange)."""
    mod = generator()
    monkeypatch.setattr(mod, "DATA", tmp_path)
    fused = [{"rows": m, "hidden": 4096, "bytes": m * 8192,
              "times_us": {"tilegen_fused": 8.0, "tilegen_unfused": 15.0, "nccl": 40.0, "symm_two_shot": 14.0},
              "times_graph_us": {"tilegen_fused": 6.0, "tilegen_unfused": 12.0, "nccl": 20.0, "symm_two_shot": 9.0},
              "max_diff_vs_nccl": {"tilegen_fused": 0.0078125 * m, "nccl": 0.0}} for m in (1, 64)]
    hot = {"world": 2, "device": "2 x GPU", "fast_op": "allreduce_bf16", "deterministic_op": "allreduce_det",
           "fused": fused, "sizes": [_sizes_row("allreduce_bf16", 16384, 10.0, 8.0),
                                     _sizes_row("allreduce_det", 16384, 11.0, 8.8)]}
    (tmp_path / "hot.json").write_text(json.dumps(hot))
    lines = mod.render_data({"file": "hot.json"})
    assert "| 1 x 4096 | 8.0 / 6.0 | 15.0 / 12.0 | 40.0 / 20.0 |  | 14.0 / 9.0 | 1.50x |" in lines
    assert any("largest difference from NCCL's: 0.5." in x for x in lines)
    assert "| 16 KiB | 10.0 / 8.0 | 11.0 / 8.8 | 0.91x | 30.0 / 12.0 | 11.0 /  | 9.0 / 7.5 | 3.00x |" in lines
    floor = {"gpus": 2, "device": "GPU", "repeats": 15, "calls": 50,
             "launch": [{"ctas": 1, "threads": 32, "param_bytes": 0, "eager_us": 2.41, "graph_us": 1.13}],
             "nvlink_one_way_us": 0.812, "exchange": [{"bytes": 256, "ctas": 1, "eager_us": 5.5, "graph_us": 3.25}]}
    (tmp_path / "floor.json").write_text(json.dumps(floor))
    lines = mod.render_data({"file": "floor.json"})
    assert "| 1 x 32 | 0 | 2.41 | 1.13 |" in lines and "| 256 B | 1 | 5.50 | 3.25 |" in lines
    assert any("store (half a ping-pong's round trip, GPU 0 and 1): 0.812 us." in x for x in lines)
    del floor["nvlink_one_way_us"], floor["exchange"]  # (one GPU: the launch floors alone)
    (tmp_path / "floor.json").write_text(json.dumps(floor))
    assert mod.render_data({"file": "floor.json"})[-1] == "| 1 x 32 | 0 | 2.41 | 1.13 |"


def test_a_run_is_recorded_from_the_labs_provenance(tmp_path, monkeypatch):
    """tools/report_measurements.py --add: the lab's provenance record of a phase (date, commit, cards, driver,
    NCCL, torch, command) and the run's place (family, machine, ranks, what, the log's section) become its
    runs.json entry, replacing an earlier one of the same file, and the reference shows them; a record without
    cards (no GPU) or an entry that fails validation leaves runs.json as it was."""
    mod = generator()
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    log.mkdir()
    (log / "2026-12.md").write_text("# December\n\n## A session\n")
    monkeypatch.setattr(mod, "DATA", data)
    monkeypatch.setattr(mod, "RUNS", data / "runs.json")
    monkeypatch.setattr(mod, "LOG_DIR", log)
    monkeypatch.setattr(mod, "DECISIONS", [])
    (data / "runs.json").write_text("[]\n")
    floor = {"gpus": 1, "device": "GPU", "repeats": 15, "calls": 50,
             "launch": [{"ctas": 1, "threads": 32, "param_bytes": 0, "eager_us": 2.41, "graph_us": 1.13}]}
    (data / "floor_h100x1.json").write_text(json.dumps(floor))
    record = {"date": "2026-12-09", "commit": "abc1234", "cards": "1 x NVIDIA H100 80GB HBM3",
              "driver": "580.159.04", "nccl": "2.27.5", "torch": "2.11.0+cu130",
              "command": "python3 -m bench probe 1 --probes latency"}
    prov = tmp_path / "provenance_probe.json"
    prov.write_text(json.dumps(record))
    args = ["--add", "floor_h100x1.json", "--provenance", str(prov), "--family", "floor", "--machine",
            "nvidia-h100-x1", "--world", "1", "--what", "launch floors", "--section", "A session"]
    out = tmp_path / "m.md"
    for _ in range(2):  # (the second replaces the first)
        assert mod.main(args + ["--out", str(out)]) == 0
    runs_now = json.loads((data / "runs.json").read_text())
    assert runs_now == [{"file": "floor_h100x1.json", "family": "floor", "what": "launch floors",
                         "machine": "nvidia-h100-x1", "world": 1, "section": "A session", **record}]
    assert set(runs_now[0]) == set(FIELDS)
    text = out.read_text()
    assert "Measured 2026-12-09, commit `abc1234`, on `nvidia-h100-x1` (1 x NVIDIA H100 80GB HBM3), 1 ranks; " \
           "driver 580.159.04, NCCL 2.27.5, torch 2.11.0+cu130." in text and "| 1 x 32 | 0 | 2.41 | 1.13 |" in text
    before = (data / "runs.json").read_text()
    prov.write_text(json.dumps({**record, "cards": None}))
    with pytest.raises(SystemExit, match="no cards recorded"):
        mod.main(args + ["--out", str(out)])
    prov.write_text(json.dumps({**record, "date": "9 Dec"}))
    with pytest.raises(SystemExit, match="is not YYYY-MM-DD"):
        mod.main(args + ["--out", str(out)])
    assert (data / "runs.json").read_text() == before
