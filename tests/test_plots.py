"""dglmm.plots: caterpillar and convergence plots, plot_result, dglmm plot."""

from __future__ import annotations

import builtins

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.cli import main
from dglmm.errors import DataError, DglmmError
from dglmm.plots import caterpillar_plot, convergence_plot, plot_result
from dglmm.simulate import FORMULA, simulate_calls

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    df, _ = simulate_calls(250, seed=7)
    re_path = str(d / "re.parquet")
    result = dglmm.fit(FORMULA, df, client="in-process", random_effects=re_path)
    result_path = str(d / "result.json")
    result.to_json(result_path)
    return {"result": result, "result_path": result_path, "re": re_path}


def is_png(path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head == PNG and path.stat().st_size > 5000


def test_plot_result_writes_pngs(fitted, tmp_path):
    out = tmp_path / "plots"
    paths = plot_result(fitted["result_path"], out, random_effects=fitted["re"])
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert names == ["convergence.png", "caterpillar_Intercept.png", "caterpillar_duration.png"]
    for p in paths:
        assert is_png(out / p.rsplit("/", 1)[-1])
    # without a table: the convergence plot only
    assert len(plot_result(fitted["result"], tmp_path / "only")) == 1


def test_caterpillar_subsets_many_groups(fitted):
    table = pd.read_parquet(fitted["re"])
    ax = caterpillar_plot(table, "duration", max_groups=40)
    assert "40 of 250 groups shown" in ax.get_title()
    (line,) = [c for c in ax.containers]  # the errorbar container
    xs = line.lines[0].get_xdata()
    assert len(xs) == 40 and np.all(np.diff(xs) >= 0)  # sorted by value
    # evenly spaced in rank: the extremes are shown
    assert xs[0] == table["duration_mean"].min() and xs[-1] == table["duration_mean"].max()
    ax = caterpillar_plot(table, "Intercept", max_groups=1000)
    assert "250 groups" in ax.get_title() and "shown" not in ax.get_title()
    ax = caterpillar_plot(table, "Intercept", max_groups=30, seed=1)
    assert "random sample" in ax.get_title()


def test_caterpillar_on_given_axes_and_mode_columns(fitted):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_parquet(fitted["re"])[["subscriber", "Intercept_mode", "Intercept_mode_sd"]]
    fig, ax = plt.subplots()
    try:
        assert caterpillar_plot(table, "Intercept", ax=ax) is ax
        assert "conditional mode" in ax.get_xlabel()
    finally:
        plt.close(fig)
    with pytest.raises(DataError, match="no term 'slope'"):
        caterpillar_plot(table, "slope")


def test_convergence_plot_marks_the_stages(fitted):
    fig = convergence_plot(fitted["result"])
    ax_ll, ax_g = fig.axes
    assert ax_g.get_yscale() == "log"
    labels = [t.get_text() for t in ax_ll.get_legend().get_texts()]
    assert labels == ["stage glm", "stage full"]
    n = sum(
        len(line.get_xdata()) for line in ax_ll.get_lines() if line.get_label().startswith("stage")
    )
    assert n == len(fitted["result"].fit_log)


def test_missing_matplotlib_is_a_clear_error(fitted, monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DglmmError, match=r"pip install dglmm\[plot\]"):
        convergence_plot(fitted["result"])


def test_cli_plot(fitted, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["plot", fitted["result_path"], "--random-effects", fitted["re"],
               "--output", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3
    for p in printed:
        assert p.endswith(".png")
    for p in out.iterdir():
        assert is_png(p)
    assert main(["plot", str(tmp_path / "missing.json"), "--output", str(out)]) == 2
