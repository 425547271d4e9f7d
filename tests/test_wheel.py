"""A wheel install works: build compkit's wheel, install it (no deps) into a fresh venv that
sees the test environment's packages through a ``.pth`` file, and run a tiny study end to end
with the installed ``compkit`` - the stage notebooks and templates come from the wheel's
package data, not from this source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from test_pipeline import EXPECTED, write_study

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{cmd}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.mark.notebooks
def test_the_wheel_installs_and_runs_a_study_without_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    dist = tmp_path / "dist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(ROOT),
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    (wheel,) = dist.glob("compkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "kit/_notebooks/03_slice_drilldown.ipynb",
        "kit/_templates/memo.html.j2",
        "kit/_templates/nbconvert/compkit/index.html.j2",
        "kit/_templates/new_study/study.yaml.j2",
        "kit/_data/demo/study.yaml",
        "kit/stages/drilldown.py",
    ):
        assert shipped in names, shipped

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    purelib = Path(
        _run(
            str(python),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=tmp_path,
            env=env,
            timeout=60,
        ).strip()
    )
    # the dependencies of this test environment, without its own (editable) compkit; their
    # data files (nbconvert's templates, kernel specs) live under its share/jupyter
    (purelib / "compkit-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "-q",
        str(wheel),
        cwd=tmp_path,
        env=env,
        timeout=300,
    )

    where = _run(
        str(python),
        "-c",
        "import kit, kit.resources as r; print(kit.__file__); print(r.notebooks_dir())",
        cwd=tmp_path,
        env=env,
        timeout=60,
    ).split()
    assert where[0].startswith(str(purelib)) and where[1].startswith(str(purelib))

    study = write_study(tmp_path / "study")
    out = tmp_path / "runs" / "tiny"
    _run(
        str(target / "bin" / "compkit"),
        "run",
        str(study),
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    verdict = json.loads((out / "verdict.json").read_text())
    assert {d["candidate"]: d["decision"] for d in verdict["decisions"]} == EXPECTED
    assert (out / "memo.html").is_file()
    record = json.loads((out / "pipeline.json").read_text())
    assert all(r["status"] == "finished" for r in record["stages"].values())
    for name in ("03_slice_drilldown", "04_calibration"):
        assert "data:image/svg+xml" in (out / "notebooks" / f"{name}.html").read_text()
