"""What each request costs each model: measured latency and price, per request.

:func:`request_costs` returns one row per ``model, item_id, repeat`` with the measured
end-to-end latency of that request and its price:

latency
    from the serving stage's synchronous profile (``serving/<model>/profiles``: the model as
    deployed, one request at a time) when it measured every item of the model, else from
    stage 2's stored outputs (``latency_s``: the eval run). ``latency_source`` says which.
price
    from the model's ``cost:`` block: token prices x the request's prompt and output tokens,
    or ``usd_per_hour`` x the request's busy seconds (one request at a time holds the
    machine for its latency). NaN when the model has no ``cost:``; the blended cost is then
    expressed in compute seconds instead (:data:`COMPUTE_UNIT`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.errors import CompkitError

COST_COLUMNS = ["model", "item_id", "repeat", "latency_s", "latency_source", "cost_usd"]
COMPUTE_UNIT = "compute seconds (no cost: block; latency stands in for cost)"


def _serving_latency(timelines: pd.DataFrame | None, model: str) -> pd.DataFrame | None:
    if timelines is None or timelines.empty or "profile" not in timelines.columns:
        return None
    tl = timelines[timelines["model"] == model]
    tl = tl[(tl["profile"] == "synchronous") & (tl["phase"] == "measure") & (tl["status"] == "ok")]
    if tl.empty:
        return None
    lat = (tl["end_s"] - tl["sent_s"]).astype(float)
    per_item = lat.groupby(tl["item_id"].astype(str)).mean()
    return per_item.rename("latency_s").reset_index()


def _price(spec, outputs: pd.DataFrame, latency: np.ndarray) -> np.ndarray:
    cost = getattr(spec, "cost", None)
    if cost is None:
        return np.full(len(outputs), np.nan)
    if cost.usd_per_hour is not None:
        return cost.usd_per_hour / 3600.0 * latency
    prompt = pd.to_numeric(outputs["prompt_tokens"], errors="coerce").to_numpy(dtype=float)
    out = pd.to_numeric(outputs["output_tokens"], errors="coerce").to_numpy(dtype=float)
    return (prompt * cost.usd_per_1m_input_tokens + out * cost.usd_per_1m_output_tokens) / 1e6


def request_costs(
    run, models: Sequence[str], *, timelines: pd.DataFrame | None = None
) -> pd.DataFrame:
    """:data:`COST_COLUMNS` for ``models`` of a :class:`kit.run.Run` (see the module docstring).

    ``timelines`` are the serving stage's per-request timelines
    (:func:`kit.stages.serving.load_timelines`), when it ran.

    Raises
    ------
    CompkitError
        When a model has no stored outputs or a request has no measured latency.
    """
    frames = []
    names = {m.name: m for m in run.study.models}
    for model in models:
        outputs = run.outputs([model])
        if outputs.empty:
            raise CompkitError(f"{run.root}: no stored outputs for model {model!r} (stage 2)")
        rows = outputs[["item_id", "repeat", "latency_s", "prompt_tokens", "output_tokens"]].copy()
        rows["item_id"] = rows["item_id"].astype(str)
        served = _serving_latency(timelines, model)
        source = "stage 2 outputs (eval run)"
        if served is not None and set(rows["item_id"]) <= set(served["item_id"]):
            rows = rows.drop(columns="latency_s").merge(served, on="item_id", how="left")
            source = "serving stage, synchronous profile"
        latency = pd.to_numeric(rows["latency_s"], errors="coerce").to_numpy(dtype=float)
        if np.isnan(latency).any():
            bad = rows.loc[np.isnan(latency), "item_id"].head(3).tolist()
            raise CompkitError(
                f"model {model!r}: {int(np.isnan(latency).sum())} request(s) without a measured "
                f"latency, e.g. items {bad}; the blended latency needs every request's"
            )
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "item_id": rows["item_id"],
                    "repeat": rows["repeat"].astype(int),
                    "latency_s": latency,
                    "latency_source": source,
                    "cost_usd": _price(names.get(model), rows, latency),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[COST_COLUMNS]
