"""Study config: what is compared, on what, and under which budget.

A study is a YAML file validated by pydantic. Relative paths in it are relative to the
study file. Errors name the key (``sampling.temperature``) and the file.

Example (``data/demo/study.yaml``)::

    name: support-demo
    eval_set: {path: support_eval.jsonl, rare_label_threshold: 0.03}
    prompt: {template: prompts/support.jinja, chat: true}
    sampling: {temperature: 0.0, max_new_tokens: 48, seed: 1234}
    repeats: 1
    baseline: {name: smollm2-fp32, runtime: transformers, model: "builtin:smollm2-135m-instruct"}
    candidates:
      - {name: smollm2-int8, runtime: transformers, model: "builtin:smollm2-135m-instruct",
         recipe: {name: int8_dynamic}}
    budget: budget.yaml
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticError

from kit.errors import CompkitError, Problem, ValidationError
from kit.safeyaml import read_yaml

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleConfig(_Strict):
    """A deterministic stratified subset of the eval set (e.g. to size a demo run).

    Items are ordered within each stratum by ``sha256("<seed>|<id>")``; each stratum gets
    its proportional share of ``n`` (largest remainders) and at least ``min_per_stratum``
    items, so rare strata (a fraud intent with 3 items) are never sampled away.
    """

    n: int = Field(ge=1, description="items to keep")
    by: list[str] = Field(
        default_factory=lambda: ["task"], description="columns that define strata"
    )
    seed: int = 0
    min_per_stratum: int = Field(default=1, ge=0)


class EvalSetConfig(_Strict):
    path: Path
    columns: dict[str, str] = Field(
        default_factory=dict, description="rename map: file column -> schema name"
    )
    task: str | None = Field(default=None, description="task for rows without a 'task' column")
    slice_columns: list[str] | None = Field(
        default=None, description="user slice columns; default all extra scalar columns"
    )
    rare_label_threshold: float = Field(default=0.03, gt=0, lt=1)
    length_buckets: list[int] = Field(
        default_factory=lambda: [64, 256, 1024], description="prompt-token bucket edges"
    )
    limit: int | None = Field(default=None, ge=1, description="use only the first N rows")
    sample: SampleConfig | None = Field(default=None, description="stratified deterministic subset")

    @field_validator("length_buckets")
    @classmethod
    def _edges(cls, v: list[int]) -> list[int]:
        if not v or sorted(set(v)) != v or v[0] <= 0:
            raise ValueError(
                "must be a non-empty, strictly increasing list of positive token counts"
            )
        return v


class PromptConfig(_Strict):
    template: Path = Field(description="Jinja template that renders the user turn for an item")
    chat: bool = Field(default=True, description="wrap in the model's chat template")
    system: str | None = Field(default=None, description="system message (chat) or preamble")
    choice_labels: Literal["letters", "text"] = Field(
        default="letters",
        description="multiple choice is scored on 'A','B',... or on the option text",
    )


class SamplingConfig(_Strict):
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    seed: int = Field(default=1234, ge=0)
    stop: list[str] = Field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class CalibrationConfig(_Strict):
    """How stage 4 reads confidence (see :mod:`kit.analysis.calibration`)."""

    confidence: Literal["auto", "choice", "mean_token", "min_token", "verbalized", "reported"] = (
        Field(
            default="auto",
            description="choice probabilities where scored, else mean token probability",
        )
    )
    n_bins: int = Field(default=10, ge=2, le=100)
    coverage: float = Field(default=0.8, gt=0, le=1, description="coverage for selective accuracy")
    target_accuracy: float = Field(
        default=0.9, gt=0, le=1, description="accuracy a threshold must reach"
    )


class RecipeSpec(_Strict):
    """A compression recipe applied to a base model to make a candidate."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Strict):
    """Where a model comes from and how it runs.

    ``model`` is interpreted by the runtime: a local HF folder, ``builtin:<name>`` for a
    model shipped with a Python package, a GGUF file, a served model name (endpoints), or
    a predictions file.
    """

    name: str = Field(pattern=NAME_PATTERN)
    runtime: str = Field(description="a name of kit.runtimes.RUNTIMES (checked by check_study)")
    model: str
    gguf_file: str | None = Field(
        default=None, description="GGUF file inside an HF folder (transformers)"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = Field(default="cpu", description="'cpu', 'cuda', 'cuda:0' or 'auto'")
    batch_size: int = Field(default=8, ge=1, le=4096)
    endpoint: str | None = Field(
        default=None, description="base URL of an OpenAI-compatible server"
    )
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the API key"
    )
    recipe: RecipeSpec | None = None
    base: str | None = Field(
        default=None, description="model the recipe starts from (default: baseline)"
    )
    score_choices: bool = Field(
        default=True, description="score classification/multiple-choice options by logprob"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="runtime-specific settings")

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    def fingerprint(self) -> str:
        """Hash of everything in the spec that can change outputs (name excluded)."""
        payload = self.model_dump(mode="json", exclude={"name", "options"})
        payload["options"] = {k: v for k, v in self.options.items() if k != "progress"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Study(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    eval_set: EvalSetConfig
    prompt: PromptConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    repeats: int = Field(default=1, ge=1, le=100)
    baseline: ModelSpec
    candidates: list[ModelSpec] = Field(default_factory=list)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    confidence: float = Field(
        default=0.95,
        ge=0.8,
        lt=1.0,
        description="level of every interval compkit reports and judges by (stages 3-7)",
    )
    budget: Path | None = None
    # set by load_study, not by the YAML
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Study:
        names = [self.baseline.name, *(c.name for c in self.candidates)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        for c in self.candidates:
            if c.base is not None and c.base not in names:
                raise ValueError(
                    f"candidate {c.name!r}: base {c.base!r} is not a model of this study"
                )
        return self

    @property
    def root(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, path: Path | str) -> Path:
        """A path from the study, resolved against the study file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def model(self, name: str) -> ModelSpec:
        for m in (self.baseline, *self.candidates):
            if m.name == name:
                return m
        raise CompkitError(
            f"study {self.name!r} has no model {name!r}; models: "
            f"{[self.baseline.name, *(c.name for c in self.candidates)]}"
        )


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML; check that the files it names exist.

    Raises
    ------
    ValidationError
        With one problem per bad key, each naming the key path and the file.
    """
    path = Path(path)
    data = read_yaml(path, what="study")
    if not isinstance(data, dict):
        raise CompkitError(f"study {path}: the top level must be a mapping of keys")
    try:
        study = Study(**data, source=path.resolve())
    except PydanticError as exc:
        raise ValidationError(f"study {path}", [_problem(path, e) for e in exc.errors()]) from None
    missing = [
        Problem(str(path), f"file not found: {study.resolve(p)}", field=key)
        for key, p in (
            ("eval_set.path", study.eval_set.path),
            ("prompt.template", study.prompt.template),
            ("budget", study.budget),
        )
        if p is not None and not study.resolve(p).exists()
    ]
    if missing:
        raise ValidationError(f"study {path}", missing)
    return study


def _problem(path: Path, err: dict[str, Any]) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    return Problem(str(path), msg, field=loc or None)


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"
