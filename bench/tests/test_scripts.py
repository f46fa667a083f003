"""The lab's scripts that run on the CPU: plots and the copy-engine calibration from sweep results."""
import importlib.util

import pytest

from bench.phases import SCRIPTS


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_ab_reads_every_rank_of_every_round_per_build(root, tmp_path):
    """bench/scripts/plot_ab.py on the ab phase's logs: each build's in-graph dispatch and combine, every rank of
    every round (a build name may hold underscores), a PNG; a log without the profile line is an error."""
    pytest.importorskip("matplotlib", reason="plotting is the [plot] extra")
    import subprocess
    import sys

    plot_ab = script_module("plot_ab")
    line = "rank {r}: in-graph timeline of op (128 tokens; us): dispatch {d}, combine {c}\n  ll_push gap 2.0\n"
    for build, round_, base in (("base", 1, 30.0), ("base", 2, 30.5), ("two_part", 1, 28.0), ("tree", 1, 26.0)):
        (tmp_path / f"ab_{build}_{round_}.log").write_text(
            "".join(line.format(r=r, d=base + r / 10, c=base + 4) for r in range(2)))
    runs = plot_ab.read_runs(tmp_path)
    assert runs["base"]["dispatch"] == [30.0, 30.1, 30.5, 30.6] and runs["tree"]["combine"] == [30.0, 30.0]
    assert set(runs) == {"base", "two_part", "tree"}
    out = tmp_path / "ab.png"
    cmd = [sys.executable, str(SCRIPTS / "plot_ab.py"), str(tmp_path), "-o", str(out), "--goal", "dispatch=30",
           "--name", "tree=landed\\nbuild"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "ab_tree_2.log").write_text("rank 0: failed\n")
    with pytest.raises(SystemExit, match="ab_tree_2.log: no 'rank N: in-graph"):
        plot_ab.read_runs(tmp_path)


def test_ce_calibrate_turns_a_sweep_into_size_ranges(tmp_path, monkeypatch):
    """bench/scripts/ce_calibrate.py: the fastest (style, splits) per measured m, boundaries at geometric
    midpoints, equal neighbours merged; what ce_config then chooses."""
    import json

    from tilegen.overlap import runtime as overlap
    cal = script_module("ce_calibrate")
    rows = [{"case": "gemm_rs M=2048", "M": 2048, "world": 4, "us": {"ce_direct_1": 120.0, "ce_ring_2": 250.0}},
            {"case": "gemm_rs M=4096", "M": 4096, "world": 4, "us": {"ce_direct_1": 230.0, "ce_direct_2": 220.0}},
            {"case": "gemm_rs M=8192", "M": 8192, "world": 4, "us": {"ce_direct_2": 400.0, "ce_ring_2": 560.0}},
            {"case": "M=2048", "M": 2048, "world": 4, "us": {"gemm_alone": 90.0}}]
    best = cal.fastest(rows)
    assert best == {("gemm_rs", 4): [(512, "direct", 1, 120.0), (1024, "direct", 2, 220.0), (2048, "direct", 2, 400.0)]}
    assert cal.ranges(best[("gemm_rs", 4)]) == [[724, "direct", 1], [1 << 30, "direct", 2]]
    (tmp_path / "box").mkdir()
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(rows))
    monkeypatch.setattr(cal, "CALIBRATIONS_DIR", tmp_path)
    monkeypatch.setattr("sys.argv", ["ce_calibrate", str(sweep), "--machine", "box"])
    cal.main()
    from tilegen.core.calibration import ce_choices, load
    choices = ce_choices(load(tmp_path / "box"), "gemm_rs", 4)
    assert [overlap.ce_config("gemm_rs", 4, m, choices) for m in (512, 724, 725, 2048)] == \
        [("direct", 1), ("direct", 1), ("direct", 2), ("direct", 2)]


def test_plot_hot_path_draws_each_world_size_and_refuses_other_results(tmp_path):
    """bench/scripts/plot_hot_path.py on bench_hot_path.py results at 2 and 4 ranks: a PNG; the sizes' series
    are the fast and deterministic ops, the baselines from the fast op's rows only (the deterministic op's run
    times them again); a file of another benchmark is refused by name."""
    pytest.importorskip("matplotlib", reason="plotting is the [plot] extra")
    import json

    plot = script_module("plot_hot_path")

    def result(world):
        fused = [{"rows": m, "hidden": h, "times_us": {"tilegen_fused": 8.0, "nccl": 30.0},
                  "times_graph_us": {"tilegen_fused": 6.0, "nccl": 20.0}} for m in (1, 8, 64) for h in (4096, 8192)]
        sizes = [{"op": op, "bytes": b, "times_us": {op: 10.0 + i, "nccl": 30.0, "torch_symm_two_shot": 9.0},
                  "times_graph_us": {op: 8.0 + i, "nccl": 12.0}}
                 for i, op in enumerate(("allreduce_bf16", "allreduce_det")) for b in (1024, 16384, 1 << 20)]
        return {"world": world, "device": "GPU", "fast_op": "allreduce_bf16", "fused": fused, "sizes": sizes}
    paths = []
    for world in (4, 2):
        paths.append(tmp_path / f"hot_np{world}.json")
        paths[-1].write_text(json.dumps(result(world)))
    series = plot.size_series(result(2))
    assert set(series) == {"allreduce_bf16", "allreduce_det", "nccl", "torch_symm_two_shot"}
    assert series["nccl"]["eager"] == [(1024, 30.0), (16384, 30.0), (1 << 20, 30.0)]  # (once per size)
    assert series["allreduce_det"]["graph"][0] == (1024, 9.0)
    out = tmp_path / "hot.png"
    assert plot.main([str(p) for p in paths] + ["-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.json").write_text(json.dumps({"world": 2, "rows": []}))
    with pytest.raises(SystemExit, match="other.json: not a bench_hot_path.py result"):
        plot.load(str(tmp_path / "other.json"))


@pytest.mark.slow  # ~15 interpreters importing torch, side by side
def test_every_script_with_flags_starts_as_the_lab_runs_it(root):
    """Each bench/scripts/ script that parses flags answers --help when run as the lab runs it (by path,
    the repository on PYTHONPATH): its imports resolve (the examples, generated, tilegen) before a device
    call spends minutes reaching it. (The move from tools/ to bench/scripts/ once left bench_llama.py
    looking for examples/ one folder too high.)"""
    import os
    import subprocess
    import sys

    from bench.phases import SCRIPTS
    scripts = sorted(p for p in SCRIPTS.glob("*.py") if "ArgumentParser" in p.read_text())
    env = dict(os.environ, PYTHONPATH=str(root))
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=root, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in scripts}
    failed = {}
    for name, proc in procs.items():
        out = proc.communicate(timeout=240)[0]
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = out[-600:]
    assert len(scripts) >= 10 and not failed, failed
