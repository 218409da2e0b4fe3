"""Where benchmark datasets come from: local copies first, then the hub ids lmms-eval has used.

lmms-eval moved its image datasets from ``lmms-lab/<name>`` to ``lmms-lab-encoder/<name>``; the paper's runs
used the first. :func:`load_hub_dataset` tries, in order, local copies under a folder (``--datasets-dir`` or
``$SCOPE_DATASETS_DIR``), then both hub ids, and names every source it tried when none loads.
"""

from __future__ import annotations

import os
from pathlib import Path

HUB_ORGS = ("lmms-lab", "lmms-lab-encoder")  # where lmms-eval's image datasets live, older first
DATASETS_DIR_ENV = "SCOPE_DATASETS_DIR"  # default folder of local benchmark copies


def dataset_sources(path: str, name: str | None, data_dir: str | None = None) -> list[tuple[str, str | None]]:
    """Where a benchmark is looked for, in order, as (source, config name) pairs.

    Local copies first, under ``data_dir`` (default ``$SCOPE_DATASETS_DIR``): ``<dir>/<repo>/<config>`` (a
    folder of that config alone), ``<dir>/<repo>`` and ``<dir>/<org>/<repo>`` for every org of
    :data:`HUB_ORGS`; each may be a ``save_to_disk`` folder or files ``datasets.load_dataset`` reads (a hub
    snapshot, parquet). Then the hub ids ``<org>/<repo>``, ``lmms-lab`` first.
    """
    repo = path.split("/")[-1]
    out: list[tuple[str, str | None]] = []
    root = data_dir or os.environ.get(DATASETS_DIR_ENV)
    if root:
        base = Path(root).expanduser()
        if name:
            out.append((str(base / repo / name), None))
        out.append((str(base / repo), name))
        out += [(str(base / org / repo), name) for org in HUB_ORGS]
    out += [(f"{org}/{repo}", name) for org in HUB_ORGS]
    return out


def read_dataset(source: str, name: str | None, split: str):
    """One source of :func:`dataset_sources`: a local folder (``load_from_disk`` output, or files) or a hub
    id. Raises what ``datasets`` raises (FileNotFoundError for a missing local folder)."""
    import datasets

    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"no folder {path}")
        if any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(str(path), name, split=split)
    return datasets.load_dataset(source, name, split=split)


def load_hub_dataset(path: str, name: str | None, split: str, data_dir: str | None = None):
    """The first of :func:`dataset_sources` that loads; a RuntimeError naming every source tried (and why
    each failed) when none does."""
    tried = []
    for source, config in dataset_sources(path, name, data_dir):
        try:
            return read_dataset(source, config, split)
        except Exception as err:  # noqa: BLE001 -- datasets raises many types for "not reachable / not cached"
            tried.append(
                f"  {source} (config {config!r}): {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            )
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    raise RuntimeError(
        f"could not load the benchmark dataset {path!r} (config {name!r}, split {split!r}); tried:\n"
        + "\n".join(tried)
        + "\n"
        + (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and the dataset is not in the local cache. "
            if offline
            else ""
        )
        + "Download it once on a machine with network access (datasets.load_dataset(...) fills "
        f"~/.cache/huggingface), point --datasets-dir / ${DATASETS_DIR_ENV} at a local copy, or pass an "
        "already loaded dataset: evaluate(..., datasets={'<task>': ds})."
    )
