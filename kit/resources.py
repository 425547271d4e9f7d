"""Where compkit's shipped files live: stage notebooks, templates, the demo study.

In a source checkout they are the top-level ``notebooks/``, ``templates/`` and ``data/demo/``
folders. A wheel ships the same folders as package data under ``kit/_notebooks``,
``kit/_templates`` and ``kit/_data`` (``setup.py`` maps them), so an installed ``compkit``
runs without the source tree. Each function returns the packaged folder when it exists and
the source tree's otherwise.

Example
-------
>>> (notebooks_dir() / "03_slice_drilldown.ipynb").is_file()
True
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from kit.errors import CompkitError

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _resolve(package: str, source: Path, marker: str) -> Path:
    """The packaged folder ``package`` (a directory on disk) or ``source``, holding ``marker``."""
    try:
        packaged = importlib.resources.files(package)
    except ModuleNotFoundError:
        packaged = None
    candidates = []
    if packaged is not None:
        for path in getattr(packaged, "_paths", [packaged]):  # a namespace package: its paths
            candidates.append(Path(str(path)))
    candidates.append(source)
    for folder in candidates:
        if (folder / marker).exists():
            return folder
    raise CompkitError(
        f"compkit's {source.name}/ folder is missing (looked for {marker} in "
        f"{', '.join(str(c) for c in candidates)}); reinstall compkit"
    )


def notebooks_dir() -> Path:
    """The folder of the stage notebooks (``01_freeze_baseline.ipynb`` ...)."""
    return _resolve("kit._notebooks", SOURCE_ROOT / "notebooks", "01_freeze_baseline.ipynb")


def templates_dir() -> Path:
    """The folder of the HTML templates (the memo, the offline notebook export)."""
    return _resolve("kit._templates", SOURCE_ROOT / "templates", "memo.html.j2")


def demo_dir() -> Path:
    """The built-in demo study's folder (``study.yaml``, eval set, template, budget)."""
    data = _resolve("kit._data", SOURCE_ROOT / "data", "demo/study.yaml")
    return data / "demo"


def is_source_notebooks(folder: Path) -> bool:
    """Whether ``folder`` is the source tree's ``notebooks/`` (Jupyter's working directory
    when a person opens a stage notebook from a checkout)."""
    try:
        return folder.resolve() == (SOURCE_ROOT / "notebooks").resolve()
    except OSError:
        return False
