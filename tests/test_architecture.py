"""The import rules of docs/ARCHITECTURE.md, checked on the source with ``ast``.

Every import counts: module level and inside functions, relative imports resolved (the graph
is built by ``benchmarks/import_graph.py``, which prints it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "import_graph.py"

DASK = ("dask", "distributed")
# the numerical core and the model description: no Dask, no driver, no api
LOW = ("dglmm.kernels", "dglmm.kernel_core", "dglmm.families", "dglmm.quadrature",
       "dglmm.design", "dglmm.formula", "dglmm.formula_safety", "dglmm.nested",
       "dglmm.nested.kernel", "dglmm.nested.rule", "dglmm.nested.tree", "dglmm.nested.modes",
       "dglmm.nested.rows")  # fmt: skip
EVALUATORS = ("dglmm.evaluator", "dglmm.dask_driver", "dglmm.dask_driver.evaluator")


def _load():
    spec = importlib.util.spec_from_file_location("dglmm_import_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ig = _load()


@pytest.fixture(scope="module")
def graph():
    return ig.import_graph(ROOT)


def _closure(adjacency: dict[str, list[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in adjacency.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_covers_every_module(graph):
    files = {p for p in (ROOT / "dglmm").rglob("*.py")}
    assert len(graph) == len(files)
    for name in ("dglmm", "dglmm.api", "dglmm.evaluator", "dglmm.postfit", "dglmm.results",
                 "dglmm.dask_driver", "dglmm.dask_driver.evaluator"):  # fmt: skip
        assert name in graph


def test_import_graph_is_acyclic(graph):
    cycle = ig.find_cycle(ig.edges(graph))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_driver_imports_dask(graph):
    for name, info in graph.items():
        if name == "dglmm.dask_driver" or name.startswith("dglmm.dask_driver."):
            continue
        for pkg in DASK:
            if pkg not in info.external:
                continue
            # predict reads dask DataFrame inputs: allowed inside functions only
            assert name == "dglmm.predict" and not info.external[pkg], (
                f"{name} imports {pkg} (lines {info.lines[pkg]}); only dglmm.dask_driver may"
            )


def test_predict_imports_dask_lazily(graph):
    """The one exception of the rule above is real and stays inside functions."""
    info = graph["dglmm.predict"]
    assert info.external.get("dask") is False
    assert info.internal.get("dglmm.dask_driver") is False


def test_low_modules_never_reach_dask_driver_or_api(graph):
    adjacency = ig.edges(graph)
    for name in LOW:
        reached = _closure(adjacency, name) | {name}
        bad = sorted(m for m in reached
                     if m == "dglmm.api" or m.startswith("dglmm.dask_driver"))  # fmt: skip
        assert not bad, f"{name} imports (directly or not) {bad}"
        for mod in reached:
            dask = [p for p in DASK if p in graph[mod].external]
            assert not dask, f"{name} reaches {mod}, which imports {dask}"


def test_results_import_no_evaluator_and_not_api(graph):
    imported = graph["dglmm.results"].internal
    bad = sorted(m for m in imported if m in EVALUATORS or m == "dglmm.api")
    lines = [graph["dglmm.results"].lines[m] for m in bad]
    assert not bad, f"dglmm.results imports {bad} (lines {lines})"
    # the post-fit computations it delegates to never import it back
    assert "dglmm.results" not in _closure(ig.edges(graph), "dglmm.postfit")


def test_dask_evaluator_takes_random_effects_frame_from_below_api(graph):
    info = graph["dglmm.dask_driver.evaluator"]
    assert "dglmm.api" not in info.internal
    assert "dglmm.evaluator" in info.internal
    assert "dglmm.api" not in _closure(ig.edges(graph), "dglmm.dask_driver")


def test_moved_names_live_in_evaluator():
    import dglmm.dask_driver.evaluator as dask_evaluator
    import dglmm.evaluator as evaluator
    import dglmm.postfit as postfit
    import dglmm.results as results

    assert evaluator.InProcessEvaluator.__module__ == "dglmm.evaluator"
    for name in ("kernel_model", "random_effects_frame", "evaluator_for"):
        assert getattr(evaluator, name).__module__ == "dglmm.evaluator"
    assert postfit.random_effects_table.__module__ == "dglmm.postfit"
    assert not hasattr(results, "InProcessEvaluator")
    assert not hasattr(dask_evaluator, "random_effects_frame")  # imported on the workers


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_graph_builder_sees_function_and_relative_imports(tmp_path):
    """A cycle closed by a relative import inside a function is found and reported."""
    _write(tmp_path, "dglmm/__init__.py", "")
    _write(tmp_path, "dglmm/a.py", "from .sub import b\n")
    _write(tmp_path, "dglmm/sub/__init__.py", "")
    _write(tmp_path, "dglmm/sub/b.py", "import numpy\n\ndef f():\n    from ..c import x\n")
    _write(tmp_path, "dglmm/c.py", "def g():\n    import dask.dataframe\n    from . import a\n"
                                   "x = 1\n")  # fmt: skip
    graph = ig.import_graph(tmp_path)
    assert ig.edges(graph) == {"dglmm": [], "dglmm.a": ["dglmm.sub.b"], "dglmm.c": ["dglmm.a"],
                               "dglmm.sub": [], "dglmm.sub.b": ["dglmm.c"]}  # fmt: skip
    assert graph["dglmm.a"].internal == {"dglmm.sub.b": True}
    assert graph["dglmm.sub.b"].internal == {"dglmm.c": False}
    assert graph["dglmm.c"].external == {"dask": False}
    assert graph["dglmm.sub.b"].external == {"numpy": True}
    cycle = ig.find_cycle(ig.edges(graph))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"dglmm.a", "dglmm.sub.b", "dglmm.c"}
    text = ig.format_graph(graph)
    assert "dglmm.sub.b -> dglmm.c (lazy)" in text.splitlines()


def test_script_prints_the_graph(capsys):
    assert ig.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dglmm.postfit -> ") and "dglmm.evaluator" in line
               for line in lines)  # fmt: skip
    assert len(lines) == len(ig.import_graph(ROOT))


def test_architecture_doc_shows_the_current_graph(graph):
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Import graph", 1)[1].split("```")[1].strip()
    assert section == ig.format_graph(graph), (
        "the Import graph section of docs/ARCHITECTURE.md is out of date: paste the output of "
        "python benchmarks/import_graph.py"
    )


def test_nested_kernel_parts_do_not_import_the_dispatcher(graph):
    """dglmm.kernels dispatches to dglmm.nested; the nested parts never import it back."""
    adjacency = ig.edges(graph)
    for name in [m for m in graph if m.startswith("dglmm.nested")]:
        assert "dglmm.kernels" not in _closure(adjacency, name), name
