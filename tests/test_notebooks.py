"""`python -m scope.reproduce` on throw-away notebooks, and the shape of the real notebooks' sources."""

from __future__ import annotations

import json

import nbformat
import pytest

from scope import reproduce
from scope.paths import NOTEBOOKS_DIR

REQUIRED_PARAMETERS = {"model", "methods", "budgets", "limit", "seed", "smoke", "results_dir", "figures_dir"}


def _notebook(path, *cells: str, parameters: str = "smoke = False\nfigures_dir = None\nresults_dir = None"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


def _outputs_text(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def test_discover_orders_and_filters(tmp_path):
    names = ["10_b.ipynb", "02_a.ipynb", "x_notes.ipynb", "01_c.ipynb", "01b_d.ipynb", "00_t.ipynb"]
    names += ["00b_e.ipynb", "00B_upper.ipynb", "00bc_two_letters.ipynb", "0b_short.ipynb"]
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "solutions").mkdir()  # sub-folders are not notebooks to run
    (tmp_path / "solutions" / "01_c_solutions.ipynb").write_text("{}")
    found = ["00_t.ipynb", "00b_e.ipynb", "01_c.ipynb", "01b_d.ipynb", "02_a.ipynb", "10_b.ipynb"]
    assert [
        p.name for p in reproduce.discover(tmp_path)
    ] == found  # a lettered notebook right after its number
    assert [p.name for p in reproduce.discover(tmp_path, ["10", "1"])] == ["01_c.ipynb", "10_b.ipynb"]
    assert [p.name for p in reproduce.discover(tmp_path, ["00b", "1b"])] == ["00b_e.ipynb", "01b_d.ipynb"]
    assert [p.name for p in reproduce.discover(tmp_path, ["0"])] == ["00_t.ipynb"]  # 00 is not 00b
    with pytest.raises(ValueError, match="07"):
        reproduce.discover(tmp_path, ["07"])
    with pytest.raises(ValueError, match="00c"):
        reproduce.discover(tmp_path, ["00c"])
    with pytest.raises(ValueError, match="like 01,02 or 00b"):
        reproduce.discover(tmp_path, ["0bb"])


def test_no_notebooks_is_not_an_error(tmp_path, capsys):
    assert reproduce.main(["--notebooks-dir", str(tmp_path), "--smoke", "--out", str(tmp_path / "o")]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_runs_in_order_passes_smoke_and_stops_loudly_on_failure(tmp_path, capsys):
    src, out = tmp_path / "nb", tmp_path / "out"
    src.mkdir()
    write_marker = (
        "import pathlib\n"
        "d = pathlib.Path(figures_dir); d.mkdir(parents=True, exist_ok=True)\n"
        "(d / 'marker.txt').write_text(f'smoke={smoke} limit={limit}')\n"
        "print('SMOKE IS', smoke)"
    )
    _notebook(src / "00_ok.ipynb", write_marker, parameters="smoke = False\nfigures_dir = None\nlimit = 1")
    _notebook(src / "01_boom.ipynb", "raise RuntimeError('deliberate failure')")
    _notebook(src / "02_never.ipynb", "print('should not run')")

    argv = ["--notebooks-dir", str(src), "--smoke", "--out", str(out), "-p", "limit=7"]
    assert reproduce.main(argv) == 1
    err = capsys.readouterr().err
    assert "01_boom.ipynb failed" in err and "deliberate failure" in err
    # The first notebook ran with the injected parameters and wrote where it was told, not into the repo.
    assert (out / "figures" / "marker.txt").read_text() == "smoke=True limit=7"
    assert "SMOKE IS True" in _outputs_text(out / "00_ok.ipynb")
    assert (out / "01_boom.ipynb").exists()  # partly executed copy, kept for the post-mortem
    assert not (out / "02_never.ipynb").exists()

    # --only skips the broken one; success prints a per-notebook timing table and the total.
    assert reproduce.main(["--notebooks-dir", str(src), "--smoke", "--out", str(out), "--only", "00"]) == 0
    printed = capsys.readouterr().out
    assert "00_ok.ipynb" in printed and "total" in printed and "01_boom" not in printed


def test_bad_param_syntax_exits_with_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--notebooks-dir", str(tmp_path), "-p", "no_equals_sign"])
    assert exc.value.code == 2


NOTEBOOKS = reproduce.discover(NOTEBOOKS_DIR)  # what make reproduce runs, 00b_how_scope_picks included
# Notebooks call library code and define no functions of their own, except these, which are the lesson
# itself or a few lines of glue a notebook cannot do without (the solutions in notebooks/solutions/ are
# answers and may define what an exercise asks for; they are not scanned here).
ALLOWED_FUNCTIONS = {
    "00_tour.ipynb": {"answer"},  # one greedy generate call, repeated per method and budget
    "00b_how_scope_picks.ipynb": {"scope_greedy"},  # the lesson: the reader writes SCOPE's greedy
}


def test_the_notebooks_are_found_in_reading_order():
    names = [p.name for p in NOTEBOOKS]
    assert names[:3] == ["00_tour.ipynb", "00b_how_scope_picks.ipynb", "01_coverage.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_sources_are_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill injects after it)"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
    assert REQUIRED_PARAMETERS <= names, f"missing parameters: {REQUIRED_PARAMETERS - names}"
    assert "smoke = False" in tagged[0].source, "the committed default is the full run"
    # Clean sources: outputs live in notebooks/executed/, not here.
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"
    )
    assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == "python3"


def test_thread_choice(monkeypatch):
    assert reproduce.choose_threads(3) == 3
    with pytest.raises(ValueError, match="threads"):
        reproduce.choose_threads(0)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(reproduce.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert reproduce.choose_threads(None) == 1  # busy machine: threads would wait on each other
    monkeypatch.setattr(reproduce.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert reproduce.choose_threads(None) is None  # idle: torch's default


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_call_library_helpers_that_exist_and_define_none_of_their_own(path):
    import re

    from scope import notebook, report, vis

    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    modules = {"vis": vis, "report": report, "notebook": notebook}
    used = set(re.findall(r"\b(vis|report|notebook)\.([A-Za-z_]\w*)", code))
    missing = sorted(f"{m}.{name}" for m, name in used if not hasattr(modules[m], name))
    assert not missing, f"{path.name} calls {missing}, which scope does not define"
    # helpers live in the library (scope.notebook, scope.report, scope.vis), not copied between notebooks
    defined = set(re.findall(r"^\s*(?:async\s+)?def (\w+)", code, flags=re.M))
    extra = sorted(defined - ALLOWED_FUNCTIONS.get(path.name, set()))
    assert not extra, (
        f"{path.name} defines {extra}: move them to scope/ (or, for a lesson, ALLOWED_FUNCTIONS)"
    )


def test_reproduce_tells_which_regenerated_tables_differ_from_the_committed(tmp_path):
    from scope.reproduce import committed_tables, compare_tables

    (tmp_path / "01_a.csv").write_text("x\n1\n")
    (tmp_path / "02_b.csv").write_text("x\n2\n")
    (tmp_path / "03_new.csv").write_text("x\n3\n")
    (tmp_path / "06_latency.csv").write_text("ms\n9\n")
    committed = {"01_a.csv": b"x\n1\n", "02_b.csv": b"x\n0\n", "06_latency.csv": b"ms\n8\n"}
    assert compare_tables(committed, tmp_path) == {
        "equal": ["01_a.csv"],
        "differ": ["02_b.csv"],
        "new": ["03_new.csv"],
        "measured": ["06_latency.csv"],
    }
    assert "01_theta_coverage.csv" in committed_tables()  # the repository's own, from git


def _noise(output) -> str | None:
    """What is wrong with one output of an executed notebook, or None: text on stderr (warnings, progress
    bars), a warning printed to stdout, or a bare return value (a figure's or an axis' repr)."""
    if output.get("output_type") == "stream":
        text = output.get("text", "")
        if output.get("name") == "stderr":
            return f"stderr: {text[:120]!r}"
        return f"warning: {text[:120]!r}" if "Warning:" in text else None
    data = output.get("data", {})
    if output.get("output_type") == "execute_result" and set(data) == {"text/plain"}:
        plain = data["text/plain"]
        return f"stray value: {plain[:80]!r}" if plain.lstrip("[(").startswith("<") else None
    return None


@pytest.mark.parametrize(
    "path", sorted((NOTEBOOKS_DIR / "executed").glob("[0-9]*.ipynb")), ids=lambda p: p.stem
)
def test_executed_notebooks_show_no_warnings_or_stray_values(path):
    nb = nbformat.read(path, as_version=4)
    found = [
        f"cell {i}: {problem}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for problem in map(_noise, cell.get("outputs", []))
        if problem
    ]
    assert not found, f"{path.name}: " + "; ".join(found)


def test_noise_is_recognised():
    assert _noise({"output_type": "stream", "name": "stderr", "text": "100%|####|"})
    assert _noise({"output_type": "stream", "name": "stdout", "text": "x.py:3: UserWarning: y"})
    assert _noise({"output_type": "execute_result", "data": {"text/plain": "<Axes: >"}})
    assert _noise({"output_type": "execute_result", "data": {"text/plain": "[<matplotlib.lines.Line2D>]"}})
    assert _noise({"output_type": "stream", "name": "stdout", "text": "22 runs; 0 to compute"}) is None
    assert _noise({"output_type": "execute_result", "data": {"text/plain": "   a  b"}}) is None
