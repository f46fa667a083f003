"""Sweeps: filters pick variants by their labels, names are derived and unique, and every variant a
sweep offers either passes tilegen's spec validation and checker or is refused with a located reason;
the default selections never are (a device call never spends its minutes on a bad one)."""
import json

import pytest

from bench import sweep
from bench.sweep import SWEEPS, parse_filter, select, variants

AG, FUSED = SWEEPS["allgather"], SWEEPS["fused"]


def names(vs):
    return [v.name for v in vs]


def test_a_filter_takes_the_variants_whose_labels_match_every_clause():
    got = select(FUSED, ("tile=128x256x64|256x128x64,cluster=2x1,schedule=coop",))
    assert names(got) == ["ag_fused_t128x256x64_c2x1_coop", "ag_fused_t256x128x64_c2x1_coop"]
    assert got[0].spec["gemm_tile"] == [128, 256, 64] and got[0].spec["gemm_cluster"] == [2, 1]
    assert "gemm_schedule" not in got[0].spec and got[0].spec["overlap"] == "fused"
    # several filters: any one matches; an axis named twice: both clauses hold
    two = select(AG, ("ctas=132,tile=1M,threads=1024,sync=per_tile", "ctas=528,tile=128K,threads=512,sync=barrier"))
    assert names(two) == ["ag_c132_1m_t1024_per_tile", "ag_c528_128k_t512_barrier"]
    assert select(AG, ("ctas=132|264,ctas=264,tile=1M,threads=512,sync=barrier",))[0].labels["ctas"] == "264"


def test_no_filter_is_the_sweeps_defaults_and_an_empty_filter_everything():
    assert names(select(AG)) == names(select(AG, AG.defaults))
    assert len(select(AG, ("",))) == len(list(variants(AG))) == 3 * 3 * 2 * 2


@pytest.mark.parametrize("text, message", [
    ("cta=132", "sweep allgather has no axis 'cta' (axes: ctas, tile, sync, threads)"),
    ("ctas=100", "axis ctas of sweep allgather has no label '100' (labels: 132, 264, 528)"),
    ("ctas", "filter clause 'ctas': expected axis=label"),
    ("ctas=", "expected axis=label"),
])
def test_a_bad_filter_names_what_the_sweep_has(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_filter(AG, text)


@pytest.mark.parametrize("sw", list(SWEEPS.values()), ids=list(SWEEPS))
def test_every_variant_is_valid_or_refused_with_a_reason_and_the_defaults_are_valid(sw, tmp_path):
    every = list(variants(sw))
    assert len(set(names(every))) == len(every)  # the derived names tell variants apart
    refused = sweep.refused(sweep.write_specs(every, tmp_path, sw))
    assert not set(refused) & set(names(select(sw))), refused
    for name, why in refused.items():  # (pingpong tiles larger than a warp group's accumulators)
        assert f"{name}.yaml:" in why and "gemm_schedule: a pingpong warp group" in why, why
    assert sw.name != "fused" or len(refused) == 9


def test_spec_files_are_deterministic_and_replace_the_folders_earlier_ones(tmp_path):
    first = sweep.write_specs(select(AG), tmp_path, AG)
    (tmp_path / "stale.yaml").write_text("{}")
    again = sweep.write_specs(select(AG), tmp_path, AG)
    assert [p.read_text() for p in first] == [p.read_text() for p in again]
    assert sorted(tmp_path.iterdir()) == sorted(again)
    spec = json.loads(again[0].read_text())
    assert spec["name"] == again[0].stem and spec["description"].startswith("sweep allgather: ctas=")
