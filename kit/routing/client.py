"""The live router: the small model answers, the policy reads its signals, the fallback model
answers what the policy routes. What stage 6 simulates, run for real.

:class:`RouterClient` sits in front of two runtimes (any of :mod:`kit.runtimes`; for served
models the ``openai`` runtime against two llama.cpp servers on loopback). Per request it asks
the small model, turns the answer into the same signals row stage 6 simulates with (the same
stored-output row, scored by the same scorer, :func:`kit.routing.signals.build_signals`),
applies the *same policy object*, and on fallback asks the large model. It times the whole
request on the client's clock (small + large when routed) and writes a request log, one JSON
object per request (:data:`LOG_FIELDS`), which ``compkit monitor`` reads later.

Example
-------
>>> with RouterClient(small=rt_small, large=rt_large, policy=rule, eval_set=items,
...                   sampling=run.sampling) as router:                       # doctest: +SKIP
...     log = router.run(requests, log_path="requests.jsonl")
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kit.errors import CompkitError
from kit.routing.policies import confidence_signal
from kit.routing.signals import SIGNAL_COLUMNS, build_signals

#: Fields of one request-log record (a JSONL line).
LOG_FIELDS = [
    "item_id",
    "repeat",
    "routed",
    "served_by",
    "output",
    "small_output",
    "small_latency_s",
    "large_latency_s",
    "total_s",
    *[c for c in SIGNAL_COLUMNS if c not in ("item_id", "repeat", "task")],
    "task",
    "correct",
    "error",
]


@dataclass(frozen=True)
class RouterRequest:
    """One request: the item it answers (for scoring and slices), its prompt and seed."""

    item_id: str
    prompt: Any  # kit.runtimes.base.Prompt
    seed: int
    repeat: int = 0
    continuations: tuple[str, ...] | None = None


class RouterClient:
    """Small model + router + fallback over two runtimes (module docstring).

    Parameters
    ----------
    small, large
        Open runtimes (:class:`kit.runtimes.base.Runtime`); the client closes them on exit.
    policy
        A :mod:`kit.routing.policies` policy (the rule stage 6 chose).
    eval_set
        The frozen items (:class:`kit.evalset.EvalSet`): answers are scored with them, so the
        log has ``correct`` where the item has a label.
    sampling
        The frozen sampling settings.
    slices
        ``frozen/slices.parquet`` when the policy has slice rules.
    quantile
        ``q`` of the token-probability quantile signal.
    """

    def __init__(
        self,
        *,
        small,
        large,
        policy,
        eval_set,
        sampling,
        slices: pd.DataFrame | None = None,
        quantile: float = 0.1,
        names: tuple[str, str] = ("small", "large"),
    ):
        self.small, self.large, self.policy = small, large, policy
        self.eval_set, self.sampling, self.slices = eval_set, sampling, slices
        self.quantile, self.names = quantile, names
        signal = confidence_signal(policy)
        self._choices = signal in ("choice_confidence", "auto_confidence")

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for rt in (self.small, self.large):
            rt.close()

    def _ask(self, runtime, name: str, req: RouterRequest) -> tuple[dict, float]:
        from kit.execute import output_row
        from kit.runtimes.base import ChoiceRequest, GenerationRequest
        from kit.store import now_iso

        start = time.perf_counter()
        (gen,) = runtime.generate(
            [GenerationRequest(req.item_id, req.prompt, req.seed)], sampling=self.sampling
        )
        scores = None
        if self._choices and req.continuations and runtime.supports_choice_scoring:
            (scores,) = runtime.score_choices(
                [ChoiceRequest(req.item_id, req.prompt, req.continuations)]
            )
        took = time.perf_counter() - start
        row = output_row(name, gen, scores, repeat=req.repeat, seed=req.seed, created=now_iso())
        return row, took

    def _score(self, row: dict) -> pd.DataFrame:
        from kit.execute import OUTPUT_COLUMNS
        from kit.scoring import score_outputs

        frame = pd.DataFrame([row], columns=OUTPUT_COLUMNS)
        return frame, score_outputs(self.eval_set, frame)

    def answer(self, req: RouterRequest) -> dict[str, Any]:
        """Serve one request through the router; returns its log record."""
        start = time.perf_counter()
        small_row, small_s = self._ask(self.small, self.names[0], req)
        outputs, outcomes = self._score(small_row)
        sig = build_signals(
            outputs, outcomes, model=self.names[0], slices=self.slices, quantile=self.quantile
        )
        routed = bool(self.policy.route(sig)[0])
        large_s, served, served_out = np.nan, outcomes, small_row
        if routed:
            served_out, large_s = self._ask(self.large, self.names[1], req)
            served = self._score(served_out)[1]
        total = time.perf_counter() - start
        record = {c: _plain(sig.iloc[0][c]) for c in SIGNAL_COLUMNS if c in sig.columns}
        record.update(
            item_id=req.item_id,
            repeat=req.repeat,
            routed=routed,
            served_by=self.names[1] if routed else self.names[0],
            output=served_out["output"],
            small_output=small_row["output"],
            small_latency_s=small_s,
            large_latency_s=_plain(large_s),
            total_s=total,
            correct=_plain(served["correct"].iloc[0]),
            error=served_out.get("error"),
        )
        return {k: record.get(k) for k in LOG_FIELDS}

    def run(
        self, requests: Sequence[RouterRequest], *, log_path: str | Path | None = None
    ) -> pd.DataFrame:
        """Serve ``requests`` one at a time (appending each record to ``log_path``)."""
        if not requests:
            raise CompkitError("the router got no requests")
        records = []
        fh = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        try:
            for req in requests:
                rec = self.answer(req)
                records.append(rec)
                if fh is not None:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
        finally:
            if fh is not None:
                fh.close()
        return pd.DataFrame(records, columns=LOG_FIELDS)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def requests_for(run, items: Sequence[str], *, repeat: int = 0) -> list[RouterRequest]:
    """The frozen prompts of ``items`` as router requests (the seed of ``repeat``)."""
    from kit.runtimes.base import repeat_seed

    prompts, conts = run.prompts, run.continuations
    missing = [i for i in items if i not in prompts]
    if missing:
        raise CompkitError(f"items {missing[:5]} are not in {run.root}'s frozen prompts")
    seed = repeat_seed(run.sampling.seed, repeat)
    return [RouterRequest(i, prompts[i], seed, repeat, conts.get(i)) for i in items]


def read_log(path: str | Path) -> pd.DataFrame:
    """A request log written by :meth:`RouterClient.run` (or any JSONL with its fields).

    Raises
    ------
    CompkitError
        Missing file, a line that is not JSON (naming it), or no ``routed`` field.
    """
    path = Path(path)
    if not path.is_file():
        raise CompkitError(f"request log {path} does not exist")
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise CompkitError(f"{path}, line {k}: not JSON ({exc})") from None
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise CompkitError(f"request log {path} is empty")
    return frame
