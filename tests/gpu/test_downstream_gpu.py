"""The downstream example's app (examples/downstream: a wheel of prebuilt ops) at this world size.

Runs when the tp_app wheel is installed (the lab installs the carried .whl/tp_app-*.whl,
built on the CPU machine by `pip wheel examples/downstream`); skipped otherwise."""
import pytest


def test_downstream_app_matches_its_references(dist_env):
    tp_app = pytest.importorskip("tp_app", reason="the tp_app wheel is not installed here")
    errs = tp_app.check(tokens=256)
    assert errs["allreduce_max_rel_err"] < 1e-2, errs
    assert errs["mlp_rel_err"] < 2e-2, errs
    prov = tp_app.provenance()
    assert all("sm_90a" in p["archs"] for p in prov.values()), prov
