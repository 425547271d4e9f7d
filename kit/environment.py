"""What machine and software a run happened on: hardware, library versions, kit git sha."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

import kit

#: Libraries whose version can change a model's outputs: a change is drift.
OUTPUT_LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "gguf", "llama_cpp_python")
#: Libraries recorded for provenance only.
OTHER_LIBRARIES = (
    "numpy",
    "pandas",
    "pyarrow",
    "datasets",
    "evaluate",
    "scipy",
    "statsmodels",
    "altair",
    "papermill",
    "pydantic",
    "httpx",
    "jinja2",
    "sacrebleu",
)


class Hardware(BaseModel):
    model_config = ConfigDict(frozen=True)
    cpu: str
    cores: int
    memory_gb: float
    gpu: str | None
    gpu_memory_gb: float | None
    platform: str
    python: str


class KitInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    version: str
    git_sha: str | None
    git_dirty: bool | None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> Hardware:
    import psutil

    gpu = gpu_mem = None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu, gpu_mem = props.name, round(props.total_memory / 2**30, 1)
    except ImportError:
        pass
    return Hardware(
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
        gpu=gpu,
        gpu_memory_gb=gpu_mem,
        platform=platform.platform(),
        python=platform.python_version(),
    )


def library_versions(
    names: tuple[str, ...] = OUTPUT_LIBRARIES + OTHER_LIBRARIES,
) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def kit_info() -> KitInfo:
    root = Path(kit.__file__).resolve().parent.parent
    sha = dirty = None
    try:
        sha = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return KitInfo(version=kit.__version__, git_sha=sha, git_dirty=dirty)
