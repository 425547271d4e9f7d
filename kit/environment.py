"""What machine and software a run happened on: hardware, library versions, kit git sha."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
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


def amx_tile_unusable() -> bool:
    """True where the CPU advertises AMX but Linux does not enable AMX tile data (some VMs,
    e.g. Firecracker): llama.cpp's AMX kernels then fault on the first decode.

    Asks Linux which extended states it supports (``arch_prctl(ARCH_GET_XCOMP_SUPP)``);
    XTILEDATA is bit 18. Needs no llama.cpp import, so a server started in a subprocess can
    be told to turn its extra buffer types off.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        if " amx_tile" not in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"):
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        supported = ctypes.c_uint64()
        if libc.syscall(158, 0x1022, ctypes.byref(supported)) != 0:  # SYS_arch_prctl
            return True
    except (OSError, AttributeError):
        return False
    return not supported.value & (1 << 18)
