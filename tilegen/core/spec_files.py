"""Stage 1, reading spec files: YAML files and Python configs into validated specs (tilegen.core.spec's
models) with where each field was written. Every problem is reported as ``path:LINE:COL: field:
message`` (1-based), never a traceback: pydantic's errors are mapped back to the YAML node or the
config's keyword that caused them.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .spec import DynamicDim, OpSpec, ShardedDim, kind_of, op_kinds, parse_spec, shown, spec_fields

SPEC_SUFFIXES = (".yaml", ".yml", ".py")

@dataclass(frozen=True)
class SourceLoc:
    path: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from."""

    spec: OpSpec
    loc: SourceLoc
    fields: tuple[tuple[str, SourceLoc], ...] = ()  # where each top-level field was written

    def at(self, field: str) -> SourceLoc:
        """Where `field` was written (the spec's own location if it was not)."""
        return dict(self.fields).get(field, self.loc)


class SpecError(Exception):
    """One or more located problems in a spec file."""

    def __init__(self, problems: list[tuple[SourceLoc, str]]):
        self.problems = [(loc, " ".join(msg.split())) for loc, msg in problems]  # one line per problem
        super().__init__("\n".join(f"{loc}: {msg}" for loc, msg in self.problems))


_UNION_TAGS = ("static", "dynamic", "sharded")


def _is_union_tag(loc: tuple, i: int) -> bool:
    """pydantic names the member of a dim union in the location: shape, k, <tag> or n, <tag>."""
    if i == 2 and loc[0] == "shape" and isinstance(loc[1], int):
        return loc[2] in _UNION_TAGS
    return i == 1 and loc[0] == "n" and loc[1] in _UNION_TAGS


def _format_field(loc: tuple) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif _is_union_tag(loc, i):
            continue
        else:
            name = str(p) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,62}", str(p)) else repr(p)[:64]
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "<spec>"


def _message(err: dict) -> str:
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        loc = tuple(err["loc"])
        tag = next((p for i, p in enumerate(loc) if _is_union_tag(loc, i)), None)
        if tag is None and len(loc) == 1 and err.get("op"):
            return _not_taken(err["op"], str(loc[0]))
        model = {"dynamic": DynamicDim, "sharded": ShardedDim}.get(tag, OpSpec)
        msg = "unknown key (allowed: " + ", ".join(model.model_fields) + ")"
    elif err["type"] == "missing":
        loc = tuple(err["loc"])
        family_field = err.get("op") and len(loc) == 1 and loc[0] not in OpSpec.model_fields
        msg = f"op {err['op']} needs {loc[0]}" if family_field else "required field is missing"
    elif "input" in err and err["type"] not in ("missing",) and "got" not in msg:
        if not isinstance(err["input"], (dict, list)):
            msg += f" (got {shown(err['input'])})"
        elif err["loc"]:  # (a rule of the whole spec gets the whole spec as its input: not worth naming)
            msg += f" (got {kind_of(err['input'])})"
    return msg


def _not_taken(op: str, field: str) -> str:
    """An unknown top-level key of an op's spec: which ops take it, if any do."""
    from .family import families
    model = next(f.spec_model for f in families() if op in f.ops)
    takers = [k for f in families() if field in f.spec_model.model_fields for k in f.ops]
    if takers:
        return f"op {op} takes no {field} (only {', '.join(takers)} take it)"
    return "unknown key (allowed: " + ", ".join(model.model_fields) + ")"


def _op_errors(errors: list[dict]) -> list[dict]:
    """The discriminated union's errors in the spec's own terms: its tag (the op) out of every
    location, kept on the error for the messages; a missing or unknown op as an error of op."""
    kinds = op_kinds()
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "union_tag_not_found":
            out.append({**err, "type": "missing", "loc": ("op",), "msg": "required field is missing"})
        elif err["type"] == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag", "")
            out.append({**err, "type": "value_error", "loc": ("op",), "input": tag,
                        "msg": f"expected one of {', '.join(kinds)}, got {shown(tag)}"})
        elif loc and loc[0] in kinds:
            out.append({**err, "loc": loc[1:], "op": loc[0]})
        else:
            out.append(err)
    return out


def _yaml_position(root: Any, loc: tuple) -> tuple[int, int]:
    """0-based (line, col) of the YAML node a pydantic error location points at."""
    node = root
    line, col = getattr(getattr(root, "lc", None), "line", 0) or 0, getattr(getattr(root, "lc", None), "col", 0) or 0
    for key in loc:
        lc = getattr(node, "lc", None)
        if isinstance(key, str) and isinstance(node, dict) and key in node:
            if lc is not None:
                pos = lc.key(key) if isinstance(node[key], dict) else lc.value(key)
                line, col = pos[0], pos[1]
            node = node[key]
        elif isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            if lc is not None:
                line, col = lc.item(key)
            node = node[key]
        # else: a union tag or a missing key: stay at the enclosing node
    return line, col


def _yaml_key_position(root: Any, loc: tuple) -> tuple[int, int] | None:
    """Position of the offending key itself (for unknown keys)."""
    node = root
    for key in loc[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    lc = getattr(node, "lc", None)
    if lc is not None and isinstance(node, dict) and loc[-1] in node:
        return tuple(lc.key(loc[-1]))  # type: ignore[return-value]
    return None


# How pydantic names the member of a plain union (e.g. `ctas: int | 'auto'`) in an error's location.
_MEMBER_TAG = re.compile(r"(int|float|str|bool|none|(constrained|function|literal|list|dict|nullable|union|"
                         r"tagged-union|json-or-python|lax|strict)[-\[].*)$")


def _is_member_tag(loc: tuple, i: int) -> bool:
    return i > 0 and isinstance(loc[i], str) and bool(_MEMBER_TAG.match(loc[i])) and not _is_union_tag(loc, i)


def _merge_union_members(errors: list[dict]) -> list[dict]:
    """One error per field of a plain union: pydantic reports each member's failure under a tag of
    its own (`ctas.constrained-int`, `ctas."literal['auto']"`); a user wants one message naming
    every accepted form."""
    merged: dict[tuple, dict] = {}
    out: list[dict] = []
    for err in errors:
        loc = tuple(err["loc"])
        tags = [i for i in range(len(loc)) if _is_member_tag(loc, i)]
        if not tags:
            out.append(err)
            continue
        bare = tuple(p for i, p in enumerate(loc) if i not in tags)
        msg = err["msg"].removeprefix("Value error, ")
        if bare in merged:
            first = merged[bare]
            alt = msg.removeprefix("Input should be ")
            if alt not in first["msg"]:
                first["msg"] += f", or {alt}"
        else:
            merged[bare] = {**err, "loc": bare, "msg": msg}
            out.append(merged[bare])
    return out


def _validation_problems(errors, path: str, locate) -> list[tuple[SourceLoc, str]]:
    """Located problems of a ValidationError (or of its errors() list)."""
    problems = []
    seen = set()
    errors = errors.errors() if isinstance(errors, ValidationError) else errors
    for err in _merge_union_members(_op_errors(errors)):
        loc = tuple(err["loc"])
        m = re.match(r"(?:Value error, )?(\w+): (.*)", err["msg"], re.S)
        if not loc and m and m.group(1) in spec_fields():  # a cross-field rule names its field
            loc, err = (m.group(1),), {**err, "msg": m.group(2)}
        line, col = locate(loc, err["type"])
        field = _format_field(loc)
        item = (SourceLoc(path, line + 1, col + 1), f"{field}: {_message(err)}")
        if item not in seen:
            seen.add(item)
            problems.append(item)
    return problems


MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 10_000  # a spec has a few dozen; YAML aliases can make a small file expand enormously


class _TooLarge(Exception):
    pass


def _plain(node: Any, budget: list[int] | None = None) -> Any:
    """ruamel round-trip containers -> plain Python (strict pydantic wants real ints/strs)."""
    budget = [MAX_SPEC_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge()
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, budget) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def load_yaml_spec(path: str | Path) -> LoadedSpec:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([(SourceLoc(path, 1, 1), f"<file>: cannot read: {e}")]) from None
    return parse_yaml_spec(text, path)


def parse_yaml_spec(text: str, path: str = "<string>") -> LoadedSpec:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(
            [(SourceLoc(path, 1, 1), f"<file>: {len(text)} characters; a spec is at most {MAX_SPEC_BYTES}")]
        )
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line, mark.column) if mark is not None else (0, 0)
        problem = (e.problem or e.context or "malformed YAML").strip()
        raise SpecError([(SourceLoc(path, line + 1, col + 1), f"<yaml>: {problem}")]) from None
    except (YAMLError, ValueError, RecursionError) as e:
        raise SpecError(
            [(SourceLoc(path, 1, 1), f"<yaml>: {str(e).splitlines()[0] if str(e) else type(e).__name__}")]
        ) from None
    if not isinstance(root, dict):
        kind = "an empty document" if root is None else kind_of(root)
        raise SpecError([(SourceLoc(path, 1, 1), f"<spec>: expected a mapping of fields, got {kind}")])
    for key in root:
        if not isinstance(key, str):
            lc = root.lc.key(key)
            raise SpecError([(SourceLoc(path, lc[0] + 1, lc[1] + 1), f"{key!r}: keys must be strings")])

    def locate(loc: tuple, etype: str) -> tuple[int, int]:
        if etype == "extra_forbidden":
            pos = _yaml_key_position(root, loc)
            if pos is not None:
                return pos
        return _yaml_position(root, loc)

    try:
        spec = parse_spec(_plain(root))
    except ValidationError as e:
        raise SpecError(_validation_problems(e, path, locate)) from None
    except (_TooLarge, RecursionError):
        raise SpecError(
            [(SourceLoc(path, 1, 1), f"<spec>: more than {MAX_SPEC_NODES} values (recursive or exploding aliases?)")]
        ) from None
    fields = tuple((str(k), SourceLoc(path, root.lc.key(k)[0] + 1, root.lc.key(k)[1] + 1)) for k in root)
    return LoadedSpec(spec, SourceLoc(path, root.lc.line + 1, root.lc.col + 1), fields)


def _python_spec_positions(path: str, text: str) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Positions of keyword/key names inside the ``SPEC = ...`` assignment of a Python config."""
    keys: dict[str, tuple[int, int]] = {}
    where = (0, 0)
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError:
        return keys, where
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SPEC" for t in node.targets):
            where = (node.lineno - 1, node.col_offset)
            value = node.value
            if isinstance(value, ast.Call):
                for kw in value.keywords:
                    if kw.arg:
                        keys[kw.arg] = (kw.value.lineno - 1, kw.value.col_offset)
            elif isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        keys[k.value] = (v.lineno - 1, v.col_offset)
    return keys, where


def config_timeout_s() -> float:
    """TILEGEN_CONFIG_TIMEOUT_S: how long a Python config may run (default 60 s)."""
    from .. import settings
    try:
        return settings.get("TILEGEN_CONFIG_TIMEOUT_S")
    except ValueError:
        text = settings.SETTINGS["TILEGEN_CONFIG_TIMEOUT_S"].text()
        raise SpecError([(SourceLoc("TILEGEN_CONFIG_TIMEOUT_S", 1, 1),
                          f"expected a positive number of seconds, got {shown(text)}")]) from None


def load_python_spec(path: str | Path) -> LoadedSpec:
    """A Python config: a module that defines ``SPEC`` as a KernelSpec or a dict of fields. It runs in
    a child process bounded in time (tilegen.core.pyconfig): however it ends, the result is a spec or a
    located error."""
    from .pyconfig import run_config
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([(SourceLoc(path, 1, 1), f"<file>: cannot read as UTF-8 Python: {e}")]) from None
    keys, where = _python_spec_positions(path, text)
    at_spec = SourceLoc(path, where[0] + 1, where[1] + 1)
    outcome = run_config(path, config_timeout_s())
    kind = outcome[0]

    def located(errors) -> SpecError:
        return SpecError(_validation_problems(errors, path,
                                              lambda loc, t: keys.get(str(loc[0]), where) if loc else where))
    if kind == "value" and isinstance(outcome[1], (OpSpec, dict)):
        try:
            spec = outcome[1] if isinstance(outcome[1], OpSpec) else parse_spec(outcome[1])
        except ValidationError as e:
            raise located(e) from None
        return LoadedSpec(spec, at_spec,
                          tuple((k, SourceLoc(path, line + 1, col + 1)) for k, (line, col) in keys.items()))
    if kind == "value":
        raise SpecError([(at_spec, f"SPEC: expected a KernelSpec or a dict, got {type(outcome[1]).__name__}")])
    if kind == "invalid":
        raise located(outcome[1])
    problem = {
        "raised": lambda: (outcome[1], f"<python>: {outcome[2]}"),
        "exit": lambda: (outcome[1], f"<python>: the config called sys.exit({outcome[2]!r}); a config defines SPEC "
                                     f"and returns"),
        "ended": lambda: (1, f"<python>: the config ended the process (exit status {outcome[1]}) before defining "
                             f"SPEC (os._exit, a signal or a crash?)"),
        "timeout": lambda: (1, f"<python>: the config ran for {outcome[1]:g} s without finishing (an endless loop? "
                               f"TILEGEN_CONFIG_TIMEOUT_S sets the bound); stopped"),
        "nospec": lambda: (1, "<spec>: a Python config must define SPEC (a KernelSpec or a dict)"),
    }
    line, msg = problem[kind]()
    raise SpecError([(SourceLoc(path, line, 1), msg)])


def load_spec(path: str | Path) -> LoadedSpec:
    p = Path(path)
    if p.suffix == ".py":
        return load_python_spec(p)
    if p.suffix in (".yaml", ".yml"):
        return load_yaml_spec(p)
    raise SpecError([(SourceLoc(str(p), 1, 1), f"<file>: expected one of {', '.join(SPEC_SUFFIXES)}")])


def defines_spec(path: Path) -> bool:
    """Whether a Python file assigns SPEC at module level (read, not run): only such files in a
    folder are spec configs; helpers beside them are not executed."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return True  # unreadable or broken: load it, so that the problem is reported where it is
    return any(isinstance(node, (ast.Assign, ast.AnnAssign))
               and any(isinstance(t, ast.Name) and t.id == "SPEC"
                       for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
               for node in tree.body)


def _spec_files_below(folder: Path) -> list[Path]:
    """A folder's spec files, its subfolders' too (sorted; names starting with '.' or '_' skipped)."""
    found = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith((".", "_")):
            continue
        if f.is_dir():
            found.extend(_spec_files_below(f))
        elif f.suffix in SPEC_SUFFIXES and (f.suffix != ".py" or defines_spec(f)):
            found.append(f)
    return found


def find_spec_files(paths: list[str | Path]) -> list[Path]:
    """Spec files named directly, or found (sorted) in the folders named and their subfolders: YAML
    files, and Python files that assign SPEC at module level."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(_spec_files_below(p) if p.is_dir() else [p])
    return files


def load_specs(paths: list[str | Path],
               allow_python: bool = True) -> tuple[list[LoadedSpec], list[tuple[SourceLoc, str]]]:
    """Load every spec; returns the good ones and all problems (including duplicate names).
    allow_python=False refuses Python configs (they run as code) instead of running them."""
    good: list[LoadedSpec] = []
    problems: list[tuple[SourceLoc, str]] = []
    names: dict[str, SourceLoc] = {}
    for f in find_spec_files(paths):
        if not f.exists():
            problems.append((SourceLoc(str(f), 1, 1), "<file>: no such file"))
            continue
        if f.suffix == ".py" and not allow_python:
            problems.append((SourceLoc(str(f), 1, 1), "<file>: a Python config runs as code; refused (--no-python)"))
            continue
        try:
            ls = load_spec(f)
        except SpecError as e:
            problems.extend(e.problems)
            continue
        if ls.spec.name in names:
            problems.append((ls.loc, f"name: {ls.spec.name!r} is already used by {names[ls.spec.name]}"))
            continue
        names[ls.spec.name] = ls.loc
        good.append(ls)
    return good, problems
