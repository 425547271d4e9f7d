"""What serving a model occupies: peak memory of its process tree, GPU memory, size on disk.

:class:`MemorySampler` samples, in a background thread, the resident set size (RSS) of a
process and all its descendants with psutil (every ``interval_s``), and the GPU memory
those processes hold (every ``gpu_interval_s``): through NVML (``pynvml``) when it is
installed, else ``nvidia-smi --query-compute-apps``; neither present means no GPU figure.
RSS summed over a tree counts pages shared between the processes more than once; a
llama.cpp server is one process, so there it is exact. For a model in the measuring process
itself (transformers), the RSS includes the interpreter and the libraries; the figure
before the model was loaded is reported next to it (``base_rss_mb``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 1e6


@dataclass(frozen=True)
class MemoryReport:
    """Peak and mean RSS of the process tree, its GPU memory, and how it was sampled."""

    peak_rss_mb: float | None
    mean_rss_mb: float | None
    samples: int
    peak_gpu_mb: float | None
    gpu_source: str | None  # "nvml" | "nvidia-smi" | None
    base_rss_mb: float | None = None


def tree_rss(pid: int) -> int | None:
    """RSS in bytes of ``pid`` and its descendants; None when the process is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def tree_pids(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.Error:
        return set()


def gpu_memory(pids: set[int]) -> tuple[float | None, str | None]:
    """(MB of GPU memory the processes hold, source) or (None, None) without a GPU tool."""
    value = _nvml_memory(pids)
    if value is not None:
        return value, "nvml"
    value = _smi_memory(pids)
    if value is not None:
        return value, "nvidia-smi"
    return None, None


def _nvml_memory(pids: set[int]) -> float | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            used = 0
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in pids and proc.usedGpuMemory:
                        used += proc.usedGpuMemory
            return used / MB
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing its driver library, no device: no figure
        return None


def _smi_memory(pids: set[int]) -> float | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0.0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            with contextlib.suppress(ValueError):
                used += float(parts[1]) * 2**20 / MB  # nvidia-smi reports MiB
    return used


class MemorySampler:
    """Sample a process tree's RSS (and GPU memory) in a thread; a context manager.

    Parameters
    ----------
    pid
        Root of the tree (a server process, or this process).
    interval_s, gpu_interval_s
        Seconds between RSS samples and between GPU samples.
    """

    def __init__(self, pid: int, *, interval_s: float = 0.2, gpu_interval_s: float = 2.0):
        self.pid = pid
        self.interval_s = interval_s
        self.gpu_interval_s = gpu_interval_s
        self._rss: list[int] = []
        self._gpu: list[float] = []
        self._gpu_source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compkit-memory", daemon=True)

    def _run(self) -> None:
        next_gpu = 0.0
        while not self._stop.is_set():
            rss = tree_rss(self.pid)
            if rss is not None:
                self._rss.append(rss)
            now = time.monotonic()
            if now >= next_gpu:
                value, source = gpu_memory(tree_pids(self.pid))
                if value is not None:
                    self._gpu.append(value)
                    self._gpu_source = source
                next_gpu = now + self.gpu_interval_s
            self._stop.wait(self.interval_s)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> MemoryReport:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        rss = self._rss
        return MemoryReport(
            peak_rss_mb=max(rss) / MB if rss else None,
            mean_rss_mb=sum(rss) / len(rss) / MB if rss else None,
            samples=len(rss),
            peak_gpu_mb=max(self._gpu) if self._gpu else None,
            gpu_source=self._gpu_source,
        )

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def size_on_disk(path: Path | None) -> int | None:
    """Bytes of a file, or of every file under a folder; None when absent."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
