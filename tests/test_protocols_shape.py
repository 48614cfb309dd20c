"""The shape of the house: no import cycle among harness modules (counting imports inside functions and those
under ``if TYPE_CHECKING``: a cycle of type hints is still two modules that need each other), arrows from suites down to protocols, and every suite's verdicts in Thresholds, each
violation one line naming the metric, its value, the threshold and the option."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.protocols import Measurement
from harness.thresholds import Thresholds

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The harness modules ``path`` imports (a name imported from a package counts as its submodule if it is one)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text()))
    return {m for m in out if m in modules and m != me}


def _graph() -> dict[str, set[str]]:
    paths = sorted((ROOT / "harness").rglob("*.py"))
    modules = {_module(p) for p in paths}
    return {_module(p): _imports(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """(At 9732b9c this found harness.locality <-> harness.session.)"""
    graph = _graph()
    assert {"harness.editing", "harness.metrics"} <= graph["harness.protocols.single"]       # the graph is read
    assert _cycles(graph) == []


def test_arrows_point_down():
    """Nothing below the protocols imports the session, the protocols or the plugin (``protocols.base``'s
    Measurement is the plain data type that verdicts read); only the plugin (and the option table it reads) knows
    pytest."""
    graph = _graph()
    upper = ({m for m in graph if m.startswith("harness.protocols")} - {"harness.protocols.base"}
             | {"harness.plugin", "harness.session"})
    for mod, deps in graph.items():
        if mod in upper or mod == "harness.cli":
            continue
        assert not deps & upper, (mod, deps & upper)
    for path in (ROOT / "harness").rglob("*.py"):
        if _module(path) not in ("harness.plugin", "harness.options", "harness.hookspec", "harness.sharding"):
            assert "import pytest" not in path.read_text(), path


def _m(**metrics):
    return Measurement(metrics)


@pytest.mark.parametrize("verdict,metrics,expected", [
    ("violations_single_edit", dict(ppl_ratio=1.2, efficacy_success=1.0), []),
    ("violations_single_edit", dict(ppl_ratio=2.0, efficacy_success=0.0),
     ["ppl_ratio=2.000 >= collapse threshold 2.0 (model collapsed; --collapse-ratio)",
      "efficacy_success=0.000 < min_efficacy 1.0 (edit did not take; --min-efficacy)"]),
    ("violations_single_edit", dict(ppl_ratio=float("nan"), efficacy_success=None),
     ["ppl_ratio=nan >= collapse threshold 2.0 (model collapsed; --collapse-ratio)"]),
    ("violations_hardedit", dict(ppl_ratio=3.0, efficacy_success=1.0),
     ["ppl_ratio=3.000 >= collapse threshold 2.0 (model collapsed; --collapse-ratio)"]),
    ("violations_sequential", dict(edits_to_collapse=None, n_edits=5), []),
    ("violations_sequential", dict(edits_to_collapse=3, n_edits=5),
     ["edits_to_collapse=3: ppl_ratio reached the collapse threshold 2.0 within 5 edits (--collapse-ratio)"]),
    ("violations_downstream", dict(downstream_boolq_before=0.6, downstream_boolq_after=0.45,
                                   downstream_boolq_drop=0.15),
     ["downstream_boolq: accuracy 0.600 -> 0.450 after the edit (drop 0.150 > max_accuracy_drop 0.1; "
      "--max-accuracy-drop)"]),
    ("violations_correlation", dict(downstream_piqa_before=0.7, downstream_piqa_after=0.7, downstream_piqa_drop=0.0,
                                    n_edits=3), []),
    ("violations_correlation", dict(downstream_piqa_before=0.7, downstream_piqa_after=0.5, downstream_piqa_drop=0.2,
                                    n_edits=3),
     ["downstream_piqa: accuracy 0.700 -> 0.500 after 3 hard edits (drop 0.200 > max_accuracy_drop 0.1; "
      "--max-accuracy-drop)"]),
    ("violations_tracing", dict(tracing_effect={"hidden": [0.0, 0.3], "mlp": [0.1]}), []),
    ("violations_tracing", dict(tracing_effect={"hidden": [0.0, -0.1]}),
     ["tracing effects out of range or never positive (max 0): restoring clean states recovered nothing at any "
      "layer"]),
    ("violations_tracing", dict(tracing_effect={"hidden": [1.5]}),
     ["tracing effects out of range or never positive (max 1.5): restoring clean states recovered nothing at any "
      "layer"]),
])
def test_verdicts(verdict, metrics, expected):
    assert getattr(Thresholds(), verdict)(_m(**metrics)) == expected


def test_verdicts_reading_info():
    t = Thresholds()
    sweep = Measurement({"best_edit_success": 0.2, "best_layer": 4}, info={"editor": "rome"})
    assert t.violations_layer_sweep(sweep) == ["best_edit_success=0.200 (layer 4) < min_sweep_success 0.5: rome "
                                               "edits no swept layer reliably (--min-sweep-success)"]
    assert t.violations_layer_sweep(Measurement({"best_edit_success": 0.5, "best_layer": 4})) == []
    problem = Measurement({"rewrite_score": 0.1, "p_target_pre": 0.2, "p_target_post": 0.25},
                          info={"problem": "fact_forcing"})
    assert t.violations_editing_problems(problem) == [
        "rewrite_score=0.100 < min_rewrite_score 0.5 (fact_forcing: P(target) 0.200 -> 0.250; --min-rewrite-score)"]
    traced = Measurement({"corruption_drop": 0.2, "p_clean": 0.8})
    assert t.untraceable(traced) == ("not traceable: the subject noise removes 0.25 of P(answer)=0.800 < "
                                     "min_trace_drop 0.5 (the prompt gives the answer away; --min-trace-drop)")
    assert t.untraceable(Measurement({"corruption_drop": 0.4, "p_clean": 0.8})) is None


def test_every_suite_reads_measure_record_assert():
    """Each suite test calls one protocol, records it and asserts one Thresholds verdict."""
    for path in sorted((ROOT / "suites").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
            src = ast.unparse(fn)
            assert "protocols." in src and "record.add(m)" in src and "harness.thresholds.violations_" in src, (
                path.name, fn.name)
