"""Compression recipes: make a candidate from a base model.

Each recipe is registered with metadata (which runtime it feeds, its parameters) and is
deterministic, so a candidate can be rebuilt from ``(base weights hash, recipe)`` and its
manifest says exactly how it was made. A distilled model needs no recipe: it is another
checkpoint.

=====================  ===========  ======================================================
recipe                 runtime      what it does
=====================  ===========  ======================================================
``bf16``               transformers cast weights to bfloat16
``int8_dynamic``       transformers ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``
                                    (int8 weights, activations quantized per batch at run time)
``int8_weight_only``   transformers per-output-channel symmetric int8 weights, dequantized
                                    on the fly; activations stay in float
``prune_magnitude``    transformers unstructured L1 magnitude pruning of ``nn.Linear`` weights
                                    at ``sparsity`` (``torch.nn.utils.prune``, made permanent)
``gguf_requant``       llamacpp     ``llama_cpp.llama_model_quantize`` to ``type`` (Q4_0,
                                    Q3_K_S, Q2_K ...) from the base GGUF
=====================  ===========  ======================================================
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit.errors import CompkitError

if TYPE_CHECKING:
    import torch

    from kit.study import RecipeSpec


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    runtime: str
    description: str
    params: dict[str, str] = field(default_factory=dict)  # name -> description (with default)


RECIPES: dict[str, RecipeInfo] = {
    r.name: r
    for r in [
        RecipeInfo("bf16", "transformers", "cast all weights to bfloat16"),
        RecipeInfo(
            "int8_dynamic",
            "transformers",
            "dynamic int8 quantization of nn.Linear (torch.ao quantize_dynamic, CPU)",
        ),
        RecipeInfo(
            "int8_weight_only",
            "transformers",
            "symmetric per-channel int8 weights, dequantized in forward",
            {"skip": "module names to keep in float (default: lm_head)"},
        ),
        RecipeInfo(
            "prune_magnitude",
            "transformers",
            "unstructured L1 magnitude pruning of nn.Linear weights",
            {
                "sparsity": "share of weights set to zero, 0-1 (required)",
                "scope": "'layer' (each Linear pruned to sparsity) or 'global' (default layer)",
                "skip": "module names not pruned (default: lm_head)",
            },
        ),
        RecipeInfo(
            "gguf_requant",
            "llamacpp",
            "requantize a GGUF with llama.cpp",
            {
                "type": "target type, e.g. Q4_0, Q3_K_S, Q2_K (required)",
                "threads": "quantization threads (default: all cores)",
            },
        ),
    ]
}


def check_recipe(recipe: RecipeSpec, *, runtime: str) -> RecipeInfo:
    """Validate a recipe spec against the registry; errors list the valid choices."""
    info = RECIPES.get(recipe.name)
    if info is None:
        raise CompkitError(f"unknown recipe {recipe.name!r}; available: {sorted(RECIPES)}")
    if info.runtime != runtime:
        raise CompkitError(
            f"recipe {recipe.name!r} makes a model for runtime {info.runtime!r}, not {runtime!r}"
        )
    unknown = sorted(set(recipe.params) - set(info.params))
    if unknown:
        raise CompkitError(
            f"recipe {recipe.name!r}: unknown parameter(s) {unknown}; "
            f"accepted: {sorted(info.params) or 'none'}"
        )
    return info


# --------------------------------------------------------------------------- torch recipes


def apply_torch_recipe(model: torch.nn.Module, recipe: RecipeSpec) -> torch.nn.Module:
    """Return the compressed model (modified in place where possible)."""
    check_recipe(recipe, runtime="transformers")
    fn: Callable[..., torch.nn.Module] = _TORCH_RECIPES[recipe.name]
    return fn(model, **recipe.params)


def _bf16(model: torch.nn.Module) -> torch.nn.Module:
    import torch

    return model.to(torch.bfloat16)


def _int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    import torch
    from torch.ao.quantization import quantize_dynamic

    _linear_modules(model, [])  # refuses a model with nothing to quantize
    with warnings.catch_warnings():  # deprecated in favour of torchao, still the reference CPU path
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def _linear_modules(model: torch.nn.Module, skip: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    import torch

    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in skip and n not in skip
    ]
    if not found:
        raise CompkitError(
            f"the model ({type(model).__name__}) has no nn.Linear layers to compress "
            f"(skipping {skip}); this recipe would change nothing"
        )
    return found


def _int8_weight_only(model: torch.nn.Module, skip: list[str] | None = None) -> torch.nn.Module:
    for name, linear in _linear_modules(model, skip if skip is not None else ["lm_head"]):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _int8_linear_class().from_linear(linear))
    return model


def _prune_magnitude(
    model: torch.nn.Module, sparsity: float, scope: str = "layer", skip: list[str] | None = None
) -> torch.nn.Module:
    import torch.nn.utils.prune as prune

    if not 0.0 <= float(sparsity) < 1.0:
        raise CompkitError(f"recipe prune_magnitude: sparsity must be in [0, 1), got {sparsity}")
    targets = [
        (m, "weight") for _, m in _linear_modules(model, skip if skip is not None else ["lm_head"])
    ]
    if scope == "global":
        prune.global_unstructured(
            targets, pruning_method=prune.L1Unstructured, amount=float(sparsity)
        )
    elif scope == "layer":
        for module, param in targets:
            prune.l1_unstructured(module, param, amount=float(sparsity))
    else:
        raise CompkitError(
            f"recipe prune_magnitude: scope must be 'layer' or 'global', got {scope!r}"
        )
    for module, param in targets:
        prune.remove(module, param)  # make permanent: zeros live in the weight itself
    return model


_TORCH_RECIPES: dict[str, Callable[..., Any]] = {
    "bf16": _bf16,
    "int8_dynamic": _int8_dynamic,
    "int8_weight_only": _int8_weight_only,
    "prune_magnitude": _prune_magnitude,
}


@functools.cache
def _int8_linear_class():
    import torch

    class _Int8WeightOnlyLinear(torch.nn.Module):
        """Linear layer with int8 weights and one float scale per output channel."""

        def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            self.register_buffer("qweight", qweight)
            self.register_buffer("scale", scale)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

        @classmethod
        def from_linear(cls, linear: torch.nn.Linear):
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
            q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
            bias = None if linear.bias is None else linear.bias.detach().clone()
            return cls(q, scale.to(linear.weight.dtype), bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
            return torch.nn.functional.linear(x, weight, self.bias)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"

    return _Int8WeightOnlyLinear


def has_packed_weights(model: torch.nn.Module) -> bool:
    """Whether the model holds int8 layers that have no standard safetensors form."""
    from torch.ao.nn.quantized.dynamic import Linear as dynamic_linear

    packed = (dynamic_linear, _int8_linear_class())
    return any(isinstance(m, packed) for m in model.modules())


def model_footprint(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count and bytes of parameters + buffers as stored (packed int8 included)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as dynamic_linear

    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for m in model.modules():  # dynamic-quantized Linear keeps packed weights outside parameters
        if isinstance(m, dynamic_linear):
            w = m.weight()
            params += w.numel()
            size += w.numel() * 1 + (m.bias().numel() * 4 if m.bias() is not None else 0)
        elif type(m).__name__ == "_Int8WeightOnlyLinear":
            params += m.qweight.numel()
    zeros = sum(int((p == 0).sum()) for p in model.parameters() if p.dtype.is_floating_point)
    return {
        "parameters": int(params),
        "size_bytes": int(size),
        "zero_parameters": zeros,
        "dtype_bytes": int(torch.finfo(next(model.parameters()).dtype).bits // 8),
    }


# --------------------------------------------------------------------------- GGUF recipe


def gguf_requantize(source: Path, target: Path, *, type: str, threads: int | None = None) -> Path:
    """Requantize ``source`` GGUF to ``type`` at ``target`` (atomic; skipped if present)."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type.upper()}", None)
    if ftype is None:
        valid = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_")
            for n in dir(llama_cpp)
            if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise CompkitError(f"recipe gguf_requant: unknown type {type!r}; valid: {valid}")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(tmp).encode(), ctypes.byref(params)
    )
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise CompkitError(
            f"recipe gguf_requant: llama.cpp failed to quantize {source} to {type} (code {rc})"
        )
    os.replace(tmp, target)
    return target
