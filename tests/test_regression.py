"""A fixed sweep on the embedded MiniLLaVA answers exactly as tests/data/regression.csv says (see
scope.regression; `make regression` rewrites the table after a deliberate change)."""

from __future__ import annotations

import pytest

from scope import lock, regression
from scope.paths import MINILLAVA_DIR


def test_the_fixed_sweep_answers_as_the_committed_table():
    if not (MINILLAVA_DIR / "model.safetensors").exists():
        pytest.skip("the embedded MiniLLaVA is not built")
    drift = lock.mismatches(packages=regression.NUMERIC_PACKAGES)
    if drift:
        pytest.skip(f"not under the environment lock ({drift}); byte equality is only promised under it")
    text = regression.table_text(regression.run())
    lines = regression.diff(text, regression.EXPECTED.read_text())
    assert not lines, "answers drifted from tests/data/regression.csv:\n" + "\n".join(lines[:40])


def test_diff_shows_a_changed_answer():
    expected = "run,idx,answer\nnone,0,yes\nnone,1,2\n"
    assert regression.diff(expected, expected) == []
    assert "+none,1,3" in regression.diff(expected.replace(",2\n", ",3\n"), expected)
