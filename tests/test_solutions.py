"""The solutions to the notebooks' exercises (notebooks/solutions/*.ipynb): each runs end to end in smoke
mode, and its assertions check the answers against the library, so a wrong answer fails here.

Solutions may define functions (they are the answers); tests/test_notebooks.py does not scan this folder.
"""

from __future__ import annotations

import re

import nbformat
import pytest

from scope.paths import NOTEBOOKS_DIR
from scope.reproduce import NOTEBOOK_PATTERN, OFFLINE_ENV

SOLUTIONS_DIR = NOTEBOOKS_DIR / "solutions"
SOLUTIONS = sorted(SOLUTIONS_DIR.glob("*.ipynb"))


def _has_exercises(path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return any(
        re.search(r"^#+ Exercises", c.source, flags=re.M) for c in nb.cells if c.cell_type == "markdown"
    )


def test_every_notebook_with_exercises_has_its_solutions_and_no_solutions_lack_a_notebook():
    with_exercises = {
        p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name) and _has_exercises(p)
    }
    solved = {p.stem.removesuffix("_solutions") for p in SOLUTIONS}
    assert all(p.stem.endswith("_solutions") for p in SOLUTIONS), "name them <notebook>_solutions.ipynb"
    assert with_exercises <= solved, f"exercises without solutions: {sorted(with_exercises - solved)}"
    notebooks = {p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")}
    assert solved <= notebooks, f"solutions of no notebook: {sorted(solved - notebooks)}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solutions_are_clean_and_take_smoke(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "smoke = False" in tagged[0].source
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"
    )
    assert any("assert " in c.source for c in nb.cells if c.cell_type == "code"), "answers must be checked"


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solutions_run_in_smoke_mode(path, tmp_path, monkeypatch):
    import papermill as pm

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # the notebooks must not depend on the working directory
    pm.execute_notebook(
        str(path),
        str(tmp_path / path.name),
        parameters={"smoke": True},
        cwd=str(tmp_path),
        progress_bar=False,
        log_output=False,
    )  # raises PapermillExecutionError (with the failing cell) on any error or failed assertion
