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
    rare_labels: list[str] | None = Field(
        default=None,
        description="labels that are rare in production traffic (an eval set may oversample "
        "them so their recall can be measured); when given, exactly these are label_rarity "
        "'rare' and rare_label_threshold is not used",
    )
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


class ReplicaResources(_Strict):
    """What one model replica (one Ray actor) reserves on the cluster."""

    num_cpus: float = Field(
        default=1.0,
        gt=0,
        le=1024,
        description="CPU cores per replica (its torch / llama.cpp threads)",
    )
    num_gpus: float = Field(
        default=0.0, ge=0, le=64, description="GPUs per replica; 0.5 puts two replicas on a GPU"
    )
    memory_gb: float | None = Field(
        default=None, gt=0, description="memory the scheduler reserves per replica (GiB)"
    )
    custom: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica, e.g. {a100: 1}"
    )

    @field_validator("custom")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, n in v.items() if not n > 0)
        if bad:
            raise ValueError(f"custom resources must be positive amounts; not {bad}")
        return v


class ExecutionConfig(_Strict):
    """Where model runs execute (:mod:`kit.engines`): in this process (``local``, the default),
    or sharded over Ray actors, one model replica per actor (``ray``). Results are the same."""

    engine: str = Field(default="local", description="a name of kit.engines.ENGINES")
    address: str | None = Field(
        default=None,
        description="Ray cluster to join ('auto', 'HOST:PORT', 'ray://HOST:10001'); "
        "default: start a local Ray on this machine",
    )
    workers: int = Field(default=2, ge=1, le=4096, description="model replicas (Ray actors)")
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    start_timeout_s: float = Field(
        default=600.0, gt=0, description="how long to wait for replicas to be placed and loaded"
    )

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from kit.engines import ENGINES  # metadata only: no engine is imported

        if v not in ENGINES:
            import difflib

            close = difflib.get_close_matches(v, list(ENGINES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown engine {v!r}{hint}; available: {sorted(ENGINES)}")
        return v


class RoutingConfig(_Strict):
    """How stage 6 builds the routed system: a candidate answers, a router sends some requests
    to the fallback model (see :mod:`kit.routing`)."""

    candidates: list[str] | None = Field(
        default=None, description="small models to route (default: every candidate)"
    )
    fallback: str | None = Field(default=None, description="fallback model (default: baseline)")
    confidence: Literal["auto", "choice", "mean_token", "min_token", "token_quantile"] = Field(
        default="auto",
        description="the small model's confidence the threshold reads (auto: choice "
        "probability where scored, else the low quantile of token probabilities)",
    )
    token_quantile: float = Field(
        default=0.1, gt=0, lt=1, description="quantile of token probabilities (token_quantile)"
    )
    parse_failure: bool = Field(default=True, description="invalid JSON / tool call -> fallback")
    abstention: bool = Field(default=True, description="'not found' / refusal -> fallback")
    slices: dict[str, list[str]] = Field(
        default_factory=dict, description="slice column -> values always sent to the fallback"
    )
    selection: Literal["split", "crossfit"] = Field(
        default="split",
        description="threshold chosen on a calibration split (verdict on the held-out items) "
        "or cross-fitted over folds (verdict on every item, each judged out of fold)",
    )
    calibration_share: float = Field(default=0.5, gt=0.05, lt=0.95)
    folds: int = Field(default=5, ge=2, le=20)
    seed: int = 0
    max_fallback_rate: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="thresholds whose fallback rate exceeds it are not chosen",
    )


class PerturbationSpec(_Strict):
    """One entry of the perturbation suite (kinds and parameters: :mod:`kit.perturb`)."""

    kind: str = Field(description="a kind of kit.perturb.PERTURBATIONS (typos, padding ...)")
    name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_]{0,39}$",
        description="the perturbation slice value and the id suffix (default: the kind)",
    )
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name derived items carry (``perturbation`` slice value, id suffix)."""
        return self.name or self.kind


class PerturbationsConfig(_Strict):
    """The perturbation suite: which derived items are frozen with the baseline.

    ``suite`` entries are kinds (``typos``) or ``{kind, name, params}``; ``items`` picks the
    eval items that get perturbed copies (default: all), ``tasks`` limits them to tasks.
    """

    suite: list[PerturbationSpec] = Field(min_length=1)
    seed: int = Field(default=0, ge=0)
    items: SampleConfig | None = Field(
        default=None, description="stratified subset of the eval set to perturb (default all)"
    )
    tasks: list[str] | None = Field(default=None, description="only items of these tasks")

    @field_validator("suite", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"kind": e} if isinstance(e, str) else e for e in v]
        return v


class DistributionsConfig(_Strict):
    """Token-level prediction distributions (teacher forcing of the baseline's answers)."""

    enabled: bool = Field(
        default=True,
        description="score the baseline's answers token by token with every in-process model",
    )
    top_k: int = Field(
        default=32, ge=1, le=4096, description="baseline tokens kept per position (plus the tail)"
    )


class TaskConfig(_Strict):
    """How one task is answered: ``tasks: {<task>: {...}}`` in a study.

    ``structured_output: json_schema`` (extraction, tool calls) constrains decoding to the
    answer's JSON schema (:mod:`kit.structured`), as production JSON paths do: llama.cpp's
    JSON-schema grammar, ``response_format`` on OpenAI-compatible servers, the llguidance
    logits processor in transformers. ``answer: choice`` (classification, multiple choice)
    makes the option with the highest summed logprob the model's answer (its ``correct``,
    recall and flips), as a deployed classifier that picks among the labels does;
    ``generated`` reads the answer from the generated text.
    """

    structured_output: Literal["none", "json_schema"] = Field(
        default="none", description="json_schema: constrained decoding to the answer's schema"
    )
    answer: Literal["generated", "choice"] = Field(
        default="generated",
        description="choice: the highest-logprob option is the answer (choice tasks only)",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=32768,
        description="this task's token limit (default: sampling.max_new_tokens), e.g. a "
        "router that answers with a label name",
    )
    max_string_length: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="maxLength of every string field in the answer's JSON schema "
        "(structured_output: json_schema): a deployed schema bounds its fields, and bounded "
        "strings let constrained decoding finish within the token limit",
    )


#: Tasks ``tasks:`` may configure, and what each setting applies to.
_SCHEMA_TASKS = ("extraction", "tool_call")
_CHOICE_TASKS = ("classification", "multiple_choice")
_TASKS = ("classification", "multiple_choice", "extraction", "refusal", "tool_call", "generation")


class RecipeSpec(_Strict):
    """A compression recipe applied to a base model to make a candidate."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


#: What a candidate is (``kind:`` on a model spec): kind -> (memo label, what it means).
#: Declared once; the memo and the candidate summary read it.
CANDIDATE_KINDS: dict[str, tuple[str, str]] = {
    "compressed": (
        "compressed",
        "a compression of the baseline's weights (quantized, pruned): the change is the loss",
    ),
    "runtime_change": (
        "runtime change (noise floor)",
        "the same weights in another runtime or file format; its change measures runtime "
        "numerics, not compression, and bounds what any candidate's change can be read against",
    ),
    "distilled": (
        "distilled",
        "another model (its own tokenizer and chat template) trained to replace the baseline; "
        "token-level comparisons are not comparable",
    ),
    "other": ("other", "a different model or setup"),
}
CandidateKind = Literal["compressed", "runtime_change", "distilled", "other"]

#: How each runtime is served when ``serving.deploy`` is not given.
DEFAULT_DEPLOY = {"llamacpp": "llamacpp_server", "openai": "openai", "transformers": "transformers"}


class ServingDeploy(_Strict):
    """How the serving stage (stage 5) deploys a model: ``serving:`` on a model spec.

    ``deploy`` is ``llamacpp_server`` (kit starts ``python -m llama_cpp.server`` on
    127.0.0.1 with the GGUF), ``openai`` (an existing OpenAI-compatible endpoint; kit only
    sends traffic) or ``transformers`` (in this process, batch profile over
    ``batch_sizes``); by default it follows the runtime (llamacpp, openai, transformers).
    """

    deploy: Literal["llamacpp_server", "openai", "transformers"] | None = Field(
        default=None, description="default: llamacpp -> llamacpp_server, openai, transformers"
    )
    n_ctx: int = Field(default=2048, ge=64, le=1_048_576, description="server context size")
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="server threads (default: this process's cores)"
    )
    parallel: int = Field(
        default=1,
        ge=1,
        le=256,
        description="parallel decoding slots; llama-cpp-python's server has one (see below)",
    )
    interrupt_requests: bool = Field(
        default=False,
        description="llama-cpp-python's --interrupt_requests (its default True cuts a running "
        "stream short when another request waits)",
    )
    logits_all: bool = Field(
        default=False,
        description="llama-cpp-python's --logits_all (its default True keeps n_ctx x vocabulary "
        "logits, 400 MB for SmolLM2 at 2048 tokens; only prompt logprobs need it)",
    )
    port: int | None = Field(default=None, ge=1024, le=65535, description="default: a free port")
    ready_timeout_s: float = Field(
        default=180.0, gt=0, le=3600, description="seconds the server may take to get ready"
    )
    extra_args: list[str] = Field(
        default_factory=list, description="more command-line arguments for the server"
    )
    endpoint: str | None = Field(
        default=None, description="openai: base URL (default: the model's endpoint)"
    )
    served_model: str | None = Field(
        default=None, description="openai: model name to request (default: the model's model)"
    )
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 4, 16],
        description="transformers: batch sizes of the in-process batch profile",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or sorted(set(v)) != v or v[0] < 1:
            raise ValueError("must be a non-empty, strictly increasing list of sizes >= 1")
        return v

    @field_validator("extra_args")
    @classmethod
    def _own_flags(cls, v: list[str]) -> list[str]:
        taken = sorted(
            {a.split("=")[0] for a in v} & {"--host", "--port", "--model", "--model_alias"}
        )
        if taken:
            raise ValueError(
                f"{taken} are set by kit (the server binds 127.0.0.1 and serves the model's "
                "own file under its name); use serving.port for a fixed port"
            )
        return v

    @field_validator("parallel")
    @classmethod
    def _one_slot(cls, v: int) -> int:
        if v != 1:
            raise ValueError(
                "llama-cpp-python's server (python -m llama_cpp.server) has no parallel slots: "
                "one model behind a lock decodes one request at a time, and concurrent "
                "requests queue; set parallel: 1 (a batching server such as vLLM can be "
                "measured with deploy: openai)"
            )
        return v

    def resolved(self, spec: ModelSpec) -> str:
        """The deploy kind for ``spec`` (the default follows its runtime)."""
        if self.deploy is not None:
            return self.deploy
        try:
            return DEFAULT_DEPLOY[spec.runtime]
        except KeyError:
            raise CompkitError(
                f"model {spec.name!r}: serving.deploy is required for runtime "
                f"{spec.runtime!r} (one of llamacpp_server, openai, transformers)"
            ) from None


class CostSpec(_Strict):
    """What serving a model costs: ``cost:`` on a model spec.

    Either ``usd_per_hour`` (the hardware the model runs on; cost per request = price per
    second / requests per second at the operating point) or the API prices
    ``usd_per_1m_input_tokens`` and ``usd_per_1m_output_tokens`` (cost per request from its
    token counts).
    """

    usd_per_hour: float | None = Field(default=None, gt=0, le=1e6)
    usd_per_1m_input_tokens: float | None = Field(default=None, ge=0, le=1e6)
    usd_per_1m_output_tokens: float | None = Field(default=None, ge=0, le=1e6)

    @model_validator(mode="after")
    def _one_mode(self) -> CostSpec:
        tokens = (self.usd_per_1m_input_tokens, self.usd_per_1m_output_tokens)
        if self.usd_per_hour is not None and any(t is not None for t in tokens):
            raise ValueError(
                "give either usd_per_hour (hardware) or usd_per_1m_input_tokens and "
                "usd_per_1m_output_tokens (an API), not both"
            )
        if self.usd_per_hour is None and any(t is None for t in tokens):
            raise ValueError(
                "needs usd_per_hour, or both usd_per_1m_input_tokens and usd_per_1m_output_tokens"
            )
        return self

    @property
    def mode(self) -> Literal["hourly", "tokens"]:
        return "hourly" if self.usd_per_hour is not None else "tokens"


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
    structured_output: bool = Field(
        default=True,
        description="false: this model decodes freely even where the study asks for "
        "structured_output (to measure parse failures without it)",
    )
    kind: CandidateKind = Field(
        default="compressed",
        description="what the candidate is (kit.study.CANDIDATE_KINDS): compressed weights, "
        "a runtime change (the noise floor, not a compression), distilled, or other",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="runtime-specific settings")
    serving: ServingDeploy | None = Field(
        default=None, description="how stage 5 deploys the model (absent: not served)"
    )
    cost: CostSpec | None = Field(default=None, description="hourly or per-token serving price")

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("serving", mode="before")
    @classmethod
    def _serving_shorthand(cls, v: Any) -> Any:
        return {"deploy": v} if isinstance(v, str) else ({} if v is True else v)

    @model_validator(mode="after")
    def _serving_fits_runtime(self) -> ModelSpec:
        if self.serving is None:
            return self
        if self.serving.deploy is None and self.runtime not in DEFAULT_DEPLOY:
            raise ValueError(
                f"serving.deploy is required for runtime {self.runtime!r} (one of "
                "llamacpp_server, openai, transformers)"
            )
        kind = self.serving.resolved(self)
        needs = {"llamacpp_server": "llamacpp", "transformers": "transformers"}.get(kind)
        if needs is not None and self.runtime != needs:
            raise ValueError(
                f"serving.deploy {kind!r} serves runtime {needs!r} models, not {self.runtime!r} "
                "(use deploy: openai for a model served elsewhere)"
            )
        if kind == "openai" and not (self.serving.endpoint or self.endpoint):
            raise ValueError(
                "serving.endpoint is required for deploy: openai (the server's base URL, "
                "e.g. http://127.0.0.1:8000/v1)"
            )
        return self

    def fingerprint(self) -> str:
        """Hash of everything in the spec that can change outputs (name, serving and cost
        excluded: how a model is served later does not change the outputs it gave; nor does
        its ``kind``)."""
        payload = self.model_dump(
            mode="json", exclude={"name", "options", "serving", "cost", "kind"}
        )
        payload["options"] = {k: v for k, v in self.options.items() if k != "progress"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


PROFILE_KINDS = (
    "synchronous",
    "concurrency",
    "throughput",
    "rate_sweep",
    "prompt_length",
    "synthetic",
)


class SLOConfig(_Strict):
    """Per-request latency objectives for goodput (a request is good when it meets all)."""

    ttft_ms: float | None = Field(default=None, gt=0, description="time to first token")
    tpot_ms: float | None = Field(default=None, gt=0, description="time per output token")
    e2e_ms: float | None = Field(default=None, gt=0, description="end-to-end latency")

    @model_validator(mode="after")
    def _some(self) -> SLOConfig:
        if self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None:
            raise ValueError("give at least one of ttft_ms, tpot_ms, e2e_ms")
        return self


class SyntheticConfig(_Strict):
    """Synthetic prompts of a fixed length, for comparison with other load tools."""

    prompt_tokens: int = Field(default=128, ge=1, le=131072)
    output_tokens: int = Field(default=64, ge=1, le=32768)


class ServingConfig(_Strict):
    """How stage 5 loads every served model: ``serving:`` at the top of a study.

    Profiles (each bounded by ``requests`` measured requests after ``warmup`` discarded
    ones and by ``max_duration_s``): ``synchronous`` (one request at a time),
    ``concurrency`` (``concurrency`` users each sending their next request when the last
    one ends), ``throughput`` (``max_concurrency`` in flight), ``rate_sweep`` (GuideLLM's
    sweep: the synchronous and throughput request rates measured first, then
    ``sweep_size - 2`` open-loop rates between them, ``constant`` or ``poisson``),
    ``prompt_length`` (shortest, long and longest frozen prompts, one at a time), and
    ``synthetic`` (fixed ``synthetic.prompt_tokens`` in / ``output_tokens`` out).
    """

    profiles: list[Literal[PROFILE_KINDS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["synchronous", "concurrency", "rate_sweep", "prompt_length"]
    )
    concurrency: list[int] = Field(default_factory=lambda: [2, 4])
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    rate_strategy: Literal["constant", "poisson"] = "constant"
    sweep_size: int = Field(default=5, ge=3, le=50, description="GuideLLM's sweep_size")
    requests: int = Field(default=20, ge=1, le=100_000, description="measured requests/profile")
    warmup: int = Field(default=2, ge=0, le=1000, description="discarded requests/profile")
    max_duration_s: float = Field(default=120.0, gt=0, le=86400, description="per profile")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="per request")
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=32768, description="default: the study's sampling.max_new_tokens"
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    slo: SLOConfig | None = Field(
        default=None, description="goodput objectives (default: the budget's latency rules)"
    )
    reference: str = Field(
        default="synchronous",
        description="profile whose latencies are the model's overall figures, e.g. "
        "synchronous or concurrency=4",
    )
    batch_flip: bool = Field(default=True, description="batch-size sensitivity (noise floor)")
    client_check: bool = Field(
        default=True, description="measure the load generator's own ceiling first"
    )
    seed: int = Field(default=0, ge=0)

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if sorted(set(v)) != v or (v and v[0] < 1):
            raise ValueError("must be a strictly increasing list of levels >= 1")
        return v

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        if not re.fullmatch(r"synchronous|throughput|concurrency=\d+|batch_size=\d+", v):
            raise ValueError(
                f"must be synchronous, throughput, concurrency=N or batch_size=N, got {v!r}"
            )
        return v


class Study(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    eval_set: EvalSetConfig
    prompt: PromptConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    repeats: int = Field(default=1, ge=1, le=100)
    baseline: ModelSpec
    candidates: list[ModelSpec] = Field(default_factory=list)
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict, description="per task: structured_output, answer"
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    perturbations: PerturbationsConfig | None = Field(
        default=None, description="derived items frozen with the baseline (kit.perturb)"
    )
    distributions: DistributionsConfig = Field(default_factory=DistributionsConfig)
    confidence: float = Field(
        default=0.95,
        ge=0.8,
        lt=1.0,
        description="level of every interval compkit reports and judges by (stages 3-7)",
    )
    budget: Path | None = None
    serving: ServingConfig = Field(
        default_factory=ServingConfig, description="load profiles of stage 5 (serving)"
    )
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig,
        description="where model runs execute: local (default) or sharded over Ray actors",
    )
    routing: RoutingConfig | None = Field(
        default=None,
        description="router and fallback of stage 6 (routing); without it stage 6 does nothing "
        "(`routing: {}` routes every candidate with the defaults)",
    )
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
        routing = self.routing
        routed = [*(routing.candidates or []), routing.fallback] if routing else []
        unknown = [n for n in routed if n is not None and n not in names]
        if unknown:
            raise ValueError(
                f"routing names model(s) {unknown} that are not in this study: {names}"
            )
        return self

    @field_validator("tasks")
    @classmethod
    def _task_settings(cls, v: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for task, cfg in v.items():
            if task not in _TASKS:
                raise ValueError(f"unknown task {task!r}; one of {list(_TASKS)}")
            if cfg.structured_output != "none" and task not in _SCHEMA_TASKS:
                raise ValueError(
                    f"{task}.structured_output applies to {list(_SCHEMA_TASKS)} (JSON answers)"
                )
            if cfg.answer != "generated" and task not in _CHOICE_TASKS:
                raise ValueError(f"{task}.answer: choice applies to {list(_CHOICE_TASKS)}")
            if cfg.max_string_length is not None and cfg.structured_output != "json_schema":
                raise ValueError(
                    f"{task}.max_string_length bounds the strings of a JSON schema: it needs "
                    f"{task}.structured_output: json_schema"
                )
        return v

    def task(self, name: str) -> TaskConfig:
        """The settings of task ``name`` (defaults when the study does not name it)."""
        return self.tasks.get(name, TaskConfig())

    @property
    def string_limits(self) -> dict[str, int]:
        """Task -> maxLength of the strings in its answer schema, where the study sets one."""
        return {t: c.max_string_length for t, c in self.tasks.items() if c.max_string_length}

    @property
    def structured_tasks(self) -> dict[str, str]:
        """Task -> structured_output mode, for the tasks that ask for one."""
        return {
            t: c.structured_output for t, c in self.tasks.items() if c.structured_output != "none"
        }

    @property
    def task_token_limits(self) -> dict[str, int]:
        """Task -> its own ``max_new_tokens``, for the tasks that set one."""
        return {t: c.max_new_tokens for t, c in self.tasks.items() if c.max_new_tokens}

    @property
    def choice_answer_tasks(self) -> tuple[str, ...]:
        """Tasks answered by the highest-logprob option (``answer: choice``)."""
        return tuple(sorted(t for t, c in self.tasks.items() if c.answer == "choice"))

    @property
    def root(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, path: Path | str) -> Path:
        """A path from the study, resolved against the study file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)

    @property
    def models(self) -> list[ModelSpec]:
        """The baseline, then the candidates."""
        return [self.baseline, *self.candidates]

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
