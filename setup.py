"""Package layout that pyproject.toml cannot express: the source tree's top-level
``notebooks/``, ``templates/`` and ``data/demo/`` ship inside the wheel as package data
(``kit/_notebooks``, ``kit/_templates``, ``kit/_data``), found at run time by
:mod:`kit.resources`. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

SHIPPED = {
    "kit._notebooks": ("notebooks", ["*.ipynb"]),
    "kit._templates": ("templates", ["*.j2", "nbconvert/*/*", "new_study/*"]),
    "kit._data": (
        "data",
        ["demo/*.yaml", "demo/*.jsonl", "demo/*.md", "demo/prompts/*", "demo/sources/*/*"],
    ),
}

setup(
    packages=[*find_packages(include=["kit", "kit.*"]), *SHIPPED],
    package_dir={"": ".", **{name: folder for name, (folder, _) in SHIPPED.items()}},
    package_data={"kit": ["py.typed"], **{name: globs for name, (_, globs) in SHIPPED.items()}},
)
