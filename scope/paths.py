"""Where the repository keeps its data: checkpoints, paper numbers, figures.

``scope`` is installed editable (``pip install -e .``) by ``make setup``, so the data folders sit next to
the package. ``SCOPE_DATA_DIR`` overrides the data location for other layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SCOPE_DATA_DIR", REPO_ROOT / "data"))
PAPER_DIR = DATA_DIR / "paper"
CONFIGS_DIR = DATA_DIR / "configs"
MINILLAVA_DIR = DATA_DIR / "minillava"
MINILLAVA_NEXT_DIR = DATA_DIR / "minillava-next"
FIGURES_DIR = REPO_ROOT / "figures"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
LOCK_FILE = REPO_ROOT / "constraints.txt"
