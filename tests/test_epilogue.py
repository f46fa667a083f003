"""Collective epilogues (spec `epilogue:`) on the CPU: the spec's rules, located errors, what is
rendered for the kernel and the binding, and the runtime's argument checks before anything loads.
The kernel itself: tests/gpu/test_epilogue_gpu.py."""
from pathlib import Path

import pytest

from tilegen.collective.runtime import CollectiveOp
from tilegen.core.pipeline import generate_op
from tilegen.core.spec_files import SpecError, parse_yaml_spec

AR = """name: ar_norm
op: allreduce
dtype: bf16
world_sizes: [2, 4]
shape:
  - {name: m, max: 256}
  - {name: hidden, max: 4096}
epilogue:
  residual: true
  rmsnorm: {eps: 1.0e-6}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_yaml_spec(text, "s.yaml")
    return [f"{loc}: {msg}" for loc, msg in e.value.problems]


def test_an_epilogue_spec_and_what_it_renders():
    s = parse_yaml_spec(AR, "s.yaml").spec
    assert s.epilogue.residual and s.epilogue.rmsnorm.eps == 1e-6 and s.epilogue.quant is None
    files = generate_op(s, "3.4.5")
    cu = files["ar_norm.cu"]
    for line in ("kEpilogue = true;", "kResidual = true;", "kRmsNorm = true;", "kQuant = 0;", "kEps = 1e-06f;",
                 f"kAccBytes = {256 * 4096 * 2}LL;"):
        assert line in cu, line
    binding = files["ar_norm_binding.cc"]
    assert "kEpilogue = true" in binding and "kOutSymmetric = false" in binding  # it reduces into its own buffer
    assert "epilogue={'residual': True" in files["op.py"].replace('"', "'")
    plain = generate_op(parse_yaml_spec(AR.split("epilogue:")[0], "s.yaml").spec, "3.4.5")["ar_norm.cu"]
    assert "kEpilogue = false;" in plain and "kAccBytes = 0LL;" in plain


@pytest.mark.parametrize("old, new, expected", [
    ("op: allreduce", "op: allgather",
     "s.yaml:8:1: epilogue: allgather cannot take one; allreduce and reduce_scatter can (their output is rows of "
     "reduced values)"),
    ("dtype: bf16", "dtype: i32",
     "s.yaml:8:1: epilogue: residual + rmsnorm works on floats: use bf16, f16 or f32, not i32"),
    ("  residual: true\n  rmsnorm: {eps: 1.0e-6}\n", "  residual: false\n",
     "s.yaml:8:1: epilogue: an epilogue needs residual: true, rmsnorm or quant"),
    ("rmsnorm: {eps: 1.0e-6}", "rmsnorm: {eps: -1.0}",
     "s.yaml:10:18: epilogue.rmsnorm.eps: Input should be greater than 0 (got -1.0)"),
    ("  residual: true\n", "  residual: true\n  quant: fp16\n",
     "s.yaml:10:10: epilogue.quant: Input should be 'fp8_e4m3' (got 'fp16')"),
    ("  - {name: hidden, max: 4096}\n", "",
     "s.yaml:7:1: epilogue: works on rows: the shape needs an inner dim ([m, hidden])"),
])
def test_epilogue_spec_errors_are_located(old, new, expected):
    text = AR.replace(old, new)
    assert text != AR
    got = errors_of(text)
    assert len(got) == 1 and got[0].startswith(expected), got


def _op(monkeypatch, epilogue):
    from tilegen.core import runtime
    monkeypatch.setitem(runtime._state, "initialised", True)
    monkeypatch.setitem(runtime._state, "world", 2)
    monkeypatch.setitem(runtime._state, "rank", 0)
    op = CollectiveOp(Path("/nonexistent"), "ar_norm", "allreduce", "bfloat16", [{"name": "m", "max": 256}, 4096],
                      [2, 4], epilogue=epilogue)
    calls = []
    op._world, op._run = 2, lambda *a: calls.append(("run",) + a)
    op._mod = type("Library", (), {"run_epilogue": lambda self, *a: calls.append(("run_epilogue",) + a)})()
    monkeypatch.setattr(op, "load", lambda: op._mod)
    return op, calls


class _T:  # a tensor's shape, all the runtime reads before the binding checks the rest
    def __init__(self, *shape):
        self.shape = shape


def test_the_runtime_names_missing_or_unexpected_epilogue_arguments(monkeypatch):
    op, calls = _op(monkeypatch, {"residual": True, "rmsnorm": 1e-5, "quant": None})
    x, res, w, out = _T(8, 4096), _T(8, 4096), _T(4096), _T(8, 4096)
    with pytest.raises(ValueError, match=r"ar_norm: residual= is required \(the op's epilogue has residual: true\)"):
        op(x, out, weight=w)
    with pytest.raises(ValueError, match=r"ar_norm: weight= is required \(the op's epilogue has rmsnorm\)"):
        op(x, out, residual=res)
    with pytest.raises(ValueError, match="ar_norm: scales= is for epilogues with quant; this op.s has residual, rmsn"):
        op(x, out, residual=res, weight=w, scales=_T(8))
    with pytest.raises(ValueError, match="input must be a tensor"):
        op(_T(8), out, residual=res, weight=w)
    assert calls == []  # nothing reached the library
    assert op(x, out, residual=res, weight=w) is out
    assert calls[0][:6] == ("run_epilogue", x, out, res, w, x)  # (scales unused: a placeholder the binding ignores)
    plain, calls = _op(monkeypatch, None)
    with pytest.raises(ValueError, match="residual=, weight= and scales= are for ops with an epilogue"):
        plain(x, out, residual=res)
