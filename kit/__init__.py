"""compkit: decide whether a compressed LLM may replace its original.

`import kit` stays light: heavy libraries (torch, transformers, altair, llama_cpp)
are imported by the modules that use them.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("compkit")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
