"""The pinned environment: ``constraints.txt`` holds the exact versions that produced ``figures/``.

    python -m scope.lock --write constraints.txt   # freeze the running environment (make lock does this)
    python -m scope.lock --check                   # which installed versions differ from the lock

``make setup`` installs with the lock as pip constraints. Figures and tables name it in their source line
(:func:`label`), and :mod:`scope.regression` only demands byte-equal results under it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import platform
import re
import subprocess
import sys
from pathlib import Path

from scope.paths import LOCK_FILE

__all__ = ["freeze", "write", "pins", "mismatches", "label", "main"]

HEADER = """\
# The exact environment that produced figures/ and notebooks/executed/ (pip constraints, Python {python}).
# make setup installs with it; make lock refreshes it to the newest releases (then run make reproduce and
# make regression, and commit what changed). torch==X admits the CPU and the CUDA builds of X alike (pip
# ignores local labels such as +cpu); the figures were made with torch {torch}.
"""


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def freeze() -> list[str]:
    """``name==version`` of every installed distribution but this package, local labels dropped, sorted."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [ln.strip() for ln in out.splitlines() if "==" in ln and not ln.startswith("#")]
    pinned = {ln.split("==")[0]: _public(ln.split("==")[1]) for ln in lines}
    return [f"{k}=={v}" for k, v in sorted(pinned.items(), key=lambda kv: kv[0].lower())]


def write(path: str | Path = LOCK_FILE) -> Path:
    """Write the lock of the running environment to ``path``."""
    torch = md.version("torch") if _installed("torch") else "(not installed)"
    text = HEADER.format(python=platform.python_version(), torch=torch) + "\n".join(freeze()) + "\n"
    Path(path).write_text(text)
    return Path(path)


def pins(path: str | Path = LOCK_FILE) -> dict[str, str]:
    """Package (lower case, ``_`` as ``-``) -> locked version."""
    out = {}
    for line in Path(path).read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s;#]+).*", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def mismatches(path: str | Path = LOCK_FILE, packages=None) -> dict[str, tuple[str, str | None]]:
    """Locked packages (all, or ``packages``) whose installed version differs: name -> (locked, installed)."""
    locked = pins(path)
    names = [_norm(p) for p in packages] if packages is not None else list(locked)
    out = {}
    for name in names:
        installed = _public(md.version(name)) if _installed(name) else None
        if locked.get(name) != installed:
            out[name] = (locked.get(name), installed)
    return out


def label(path: str | Path = LOCK_FILE) -> str:
    """How a figure names its environment: ``"constraints.txt sha256:1a2b3c4d"`` (or that there is no lock)."""
    path = Path(path)
    if not path.exists():
        return "no environment lock"
    return f"{path.name} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scope.lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="PATH", type=Path, help="freeze the running environment to PATH")
    parser.add_argument(
        "--check", action="store_true", help="list installed versions that differ from the lock"
    )
    args = parser.parse_args(argv)
    if args.write:
        print(f"wrote {write(args.write)}")
    if args.check or not args.write:
        diff = mismatches()
        for name, (locked, installed) in diff.items():
            print(f"{name}: locked {locked}, installed {installed}")
        print(
            "the environment matches the lock" if not diff else f"{len(diff)} package(s) differ from the lock"
        )
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
