"""Router policies: when a request answered by the small model goes to the fallback model.

A policy reads a *signals* frame (one row per request: the small model's confidences, whether
its answer parsed, whether it abstained, the request's slice columns; see
:mod:`kit.routing.signals`) and returns a boolean array: ``True`` = send to the fallback.
The same policy object decides in the simulation (:mod:`kit.routing.simulate`) and in the live
router (:class:`kit.routing.client.RouterClient`), so what is judged is what is deployed.

Policies are values (frozen dataclasses) and compose: :class:`AnyOf` routes when any part
does (the usual "confidence below t, or invalid JSON, or every fraud_report"), and
:class:`Cascade` chains more than two models, each stage with its own policy. Every policy
says in plain words what it does (:meth:`describe`), which the memo prints as the rule to
deploy. :data:`POLICIES` registers them with metadata; :func:`policy_from_config` builds the
study's policy from its ``routing:`` block.

Example
-------
>>> rule = AnyOf((ConfidenceBelow(source="mean_token", threshold=0.62),
...               SliceRule(column="label", values=("fraud_report",))))
>>> rule.describe()
'mean token probability < 0.62, or every label = fraud_report'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from kit.errors import CompkitError

#: Confidence sources a threshold may read (columns of the signals frame).
CONFIDENCE_SOURCES: dict[str, tuple[str, str]] = {
    "auto": (
        "auto_confidence",
        "confidence",
    ),
    "choice": ("choice_confidence", "choice probability (normalized over the options)"),
    "mean_token": ("mean_token_prob", "mean token probability"),
    "min_token": ("min_token_prob", "lowest token probability"),
    "token_quantile": ("token_quantile_prob", "low quantile of the token probabilities"),
}
Source = Literal["auto", "choice", "mean_token", "min_token", "token_quantile"]


def _column(signals: pd.DataFrame, name: str, policy: str) -> np.ndarray:
    if name not in signals.columns:
        raise CompkitError(
            f"router policy {policy!r} reads signal column {name!r}, which the signals frame "
            f"lacks; columns: {list(signals.columns)} (build it with kit.routing.signals)"
        )
    return signals[name].to_numpy()


@dataclass(frozen=True)
class ConfidenceBelow:
    """Route when the small model's confidence is below ``threshold`` (a missing confidence
    routes: the router cannot vouch for an answer it cannot score)."""

    source: Source = "mean_token"
    threshold: float = 0.5
    kind: str = field(default="confidence", init=False)

    def __post_init__(self) -> None:
        if self.source not in CONFIDENCE_SOURCES:
            raise CompkitError(
                f"confidence source {self.source!r} is not one of {list(CONFIDENCE_SOURCES)}"
            )
        if not np.isfinite(self.threshold) or not -1e-12 <= self.threshold <= 1 + 1e-12:
            raise CompkitError(f"confidence threshold must be in [0, 1], got {self.threshold}")

    @property
    def signal(self) -> str:
        return CONFIDENCE_SOURCES[self.source][0]

    def route(self, signals: pd.DataFrame) -> np.ndarray:
        conf = pd.to_numeric(pd.Series(_column(signals, self.signal, "confidence")))
        conf = conf.to_numpy(dtype=np.float64)
        return np.isnan(conf) | (conf < self.threshold)

    def describe(self) -> str:
        return f"{CONFIDENCE_SOURCES[self.source][1]} < {self.threshold:.3g}"

    def with_threshold(self, threshold: float) -> ConfidenceBelow:
        return replace(self, threshold=float(threshold))


@dataclass(frozen=True)
class ParseFailure:
    """Route answers that are not strict JSON or not a well-formed tool call."""

    kind: str = field(default="parse_failure", init=False)

    def route(self, signals: pd.DataFrame) -> np.ndarray:
        return _column(signals, "parse_failed", "parse_failure").astype(bool)

    def describe(self) -> str:
        return "the answer is not valid JSON / a well-formed tool call"


@dataclass(frozen=True)
class Abstention:
    """Route answers that abstain: "not found" / "I don't know", or no readable label or
    option (a refusal is not an abstention; see :mod:`kit.routing.signals`)."""

    kind: str = field(default="abstention", init=False)

    def route(self, signals: pd.DataFrame) -> np.ndarray:
        return _column(signals, "abstained", "abstention").astype(bool)

    def describe(self) -> str:
        return "the answer abstains ('not found', no readable label or option)"


@dataclass(frozen=True)
class SliceRule:
    """Route every request whose slice ``column`` is one of ``values`` ("rare labels and long
    context go to the baseline"). Slice columns must be known before the answer (the eval
    set's own columns, ``length_bucket``, ``task``): never the gold label."""

    column: str
    values: tuple[str, ...]
    kind: str = field(default="slice", init=False)

    def __post_init__(self) -> None:
        if not self.values:
            raise CompkitError(f"slice rule on {self.column!r} names no values")
        object.__setattr__(self, "values", tuple(str(v) for v in self.values))

    def route(self, signals: pd.DataFrame) -> np.ndarray:
        col = _column(signals, self.column, f"slice {self.column}")
        return pd.Series(col).astype(str).isin(self.values).to_numpy()

    def describe(self) -> str:
        return f"every {self.column} = {' / '.join(self.values)}"


@dataclass(frozen=True)
class AnyOf:
    """Route when any of ``parts`` routes."""

    parts: tuple[Any, ...]
    kind: str = field(default="any_of", init=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise CompkitError("AnyOf needs at least one policy")

    def route(self, signals: pd.DataFrame) -> np.ndarray:
        out = np.zeros(len(signals), dtype=bool)
        for part in self.parts:
            out |= part.route(signals)
        return out

    def describe(self) -> str:
        return ", or ".join(p.describe() for p in self.parts)

    @property
    def thresholded(self) -> ConfidenceBelow | None:
        """The confidence part whose threshold the simulation sweeps (None: no threshold)."""
        return next((p for p in self.parts if isinstance(p, ConfidenceBelow)), None)

    def with_threshold(self, threshold: float) -> AnyOf:
        part = self.thresholded
        if part is None:
            return self
        return AnyOf(tuple(p.with_threshold(threshold) if p is part else p for p in self.parts))


def describe_rule(policy: Any, *, fallback: str = "the fallback") -> str:
    """The rule to deploy in words: ``route to the baseline when ... , or every ...``."""
    return f"route to {fallback} when {policy.describe()}"


def threshold_of(policy: Any) -> float | None:
    """The swept threshold of a policy (its confidence part), None when it has none."""
    if isinstance(policy, ConfidenceBelow):
        return policy.threshold
    if isinstance(policy, AnyOf) and policy.thresholded is not None:
        return policy.thresholded.threshold
    return None


def confidence_signal(policy: Any) -> str | None:
    """The signal column the policy's threshold reads."""
    part = policy if isinstance(policy, ConfidenceBelow) else getattr(policy, "thresholded", None)
    return part.signal if part is not None else None


@dataclass(frozen=True)
class Cascade:
    """More than two models: ``models[0]`` answers first; stage ``k``'s policy sends a request
    on to ``models[k + 1]``; the last model answers whatever reaches it.

    ``route_stages`` reads one signals frame per model (the signals of every model on every
    request, as the simulation has them) and returns the index of the model whose answer is
    served; the request paid every model up to it.
    """

    models: tuple[str, ...]
    policies: tuple[Any, ...]
    kind: str = field(default="cascade", init=False)

    def __post_init__(self) -> None:
        if len(self.models) < 2 or len(self.policies) != len(self.models) - 1:
            raise CompkitError(
                f"a cascade over {len(self.models)} model(s) needs at least 2 models and one "
                f"policy per step ({len(self.models) - 1}), got {len(self.policies)}"
            )

    def final_stage(self, signals: Mapping[str, pd.DataFrame]) -> np.ndarray:
        missing = [m for m in self.models[:-1] if m not in signals]
        if missing:
            raise CompkitError(f"cascade: no signals for model(s) {missing}")
        n = len(signals[self.models[0]])
        stage = np.zeros(n, dtype=int)
        for k, (model, policy) in enumerate(zip(self.models[:-1], self.policies, strict=True)):
            moved = (stage == k) & policy.route(signals[model])
            stage[moved] = k + 1
        return stage

    def describe(self) -> str:
        steps = [
            f"{a} answers; to {b} when {p.describe()}"
            for a, b, p in zip(self.models, self.models[1:], self.policies, strict=False)
        ]
        return "; ".join(steps)


@dataclass(frozen=True)
class PolicyInfo:
    """A registered policy kind and what it needs."""

    name: str
    description: str
    signals: tuple[str, ...]
    thresholded: bool
    build: Callable[..., Any]
    params: Mapping[str, str] = field(default_factory=dict)


#: Registered policy kinds (name -> metadata); build one with :func:`make_policy`.
POLICIES: dict[str, PolicyInfo] = {
    "confidence": PolicyInfo(
        "confidence",
        "the small model's own confidence below a threshold (swept by the simulation)",
        tuple(c for c, _ in CONFIDENCE_SOURCES.values()),
        True,
        ConfidenceBelow,
        {"source": f"one of {list(CONFIDENCE_SOURCES)}", "threshold": "in [0, 1]"},
    ),
    "parse_failure": PolicyInfo(
        "parse_failure",
        "invalid JSON or a malformed tool call goes to the fallback",
        ("parse_failed",),
        False,
        ParseFailure,
    ),
    "abstention": PolicyInfo(
        "abstention",
        "'not found' and unreadable answers go to the fallback (refusals stay: a safety decision)",
        ("abstained",),
        False,
        Abstention,
    ),
    "slice": PolicyInfo(
        "slice",
        "every request of the named slice values goes to the fallback",
        (),
        False,
        SliceRule,
        {"column": "a slice column known before answering", "values": "values routed"},
    ),
    "any_of": PolicyInfo(
        "any_of", "route when any part routes", (), True, lambda *parts: AnyOf(tuple(parts))
    ),
    "cascade": PolicyInfo(
        "cascade", "a chain of more than two models, one policy per step", (), True, Cascade
    ),
}


def make_policy(name: str, **params: Any) -> Any:
    """Build a registered policy by name (:data:`POLICIES`).

    Raises
    ------
    CompkitError
        Unknown name (listing the registered ones) or bad parameters.
    """
    if name not in POLICIES:
        raise CompkitError(f"unknown router policy {name!r}; policies: {', '.join(POLICIES)}")
    try:
        return POLICIES[name].build(**params)
    except TypeError as exc:
        raise CompkitError(
            f"router policy {name!r}: {exc}; parameters: {dict(POLICIES[name].params)}"
        ) from None


def policy_from_config(
    config: Any,
    *,
    source: str,
    threshold: float = 0.5,
    slice_columns: Sequence[str] = (),
    tasks: Sequence[str] | None = None,
) -> AnyOf:
    """The study's policy (``routing:`` of :class:`kit.study.Study`) at ``threshold``.

    ``source`` is the confidence source (:data:`CONFIDENCE_SOURCES`); ``tasks`` the run's
    tasks: the parse-failure part is left out when no task answers in JSON.
    """
    parts: list[Any] = [ConfidenceBelow(source=source, threshold=threshold)]
    json_tasks = tasks is None or bool({"extraction", "tool_call"} & set(tasks))
    if config.parse_failure and json_tasks:
        parts.append(ParseFailure())
    if config.abstention:
        parts.append(Abstention())
    for column, values in config.slices.items():
        if slice_columns and column not in slice_columns:
            raise CompkitError(
                f"routing.slices names column {column!r}, which is not a slice of this run; "
                f"slices: {list(slice_columns)}"
            )
        parts.append(SliceRule(column=column, values=tuple(values)))
    return AnyOf(tuple(parts))
