"""scope.lock: the pinned environment that produced figures/."""

from __future__ import annotations

import importlib.metadata as md

from scope import lock
from scope.paths import LOCK_FILE


def test_the_lock_pins_every_dependency_of_the_package():
    pins = lock.pins(LOCK_FILE)
    for name in ("torch", "transformers", "tokenizers", "datasets", "numpy", "pandas", "seaborn", "papermill"):
        assert name in pins, f"{name} is not pinned in {LOCK_FILE.name}"
    assert "+" not in pins["torch"]  # a public version: the CPU and CUDA builds both satisfy it


def test_mismatches_name_what_differs(tmp_path):
    numpy = md.version("numpy")
    path = tmp_path / "constraints.txt"
    path.write_text(f"# header\nnumpy==0.0.1\nNot_A-Real.package==1.0\npandas=={md.version('pandas')}\n")
    assert lock.pins(path) == {"numpy": "0.0.1", "not-a-real-package": "1.0", "pandas": md.version("pandas")}
    assert lock.mismatches(path) == {"numpy": ("0.0.1", numpy), "not-a-real-package": ("1.0", None)}
    assert lock.mismatches(path, ["pandas"]) == {}


def test_label_names_the_lock_by_its_contents(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("numpy==1\n")
    first = lock.label(path)
    path.write_text("numpy==2\n")
    assert first.startswith("constraints.txt sha256:") and lock.label(path) != first
    assert lock.label(tmp_path / "missing.txt") == "no environment lock"
