"""The routed system simulated from per-item outcomes: small model + router + fallback.

Every request is answered by the small model; the router (:mod:`kit.routing.policies`) reads
its signals and sends some requests on to the fallback (large) model, whose answer is then
served. From the stored outcomes of both models on the same items the blended system's
outcome of every request is known exactly (the fallback's outcome where routed, the small
model's elsewhere), so every budget metric of the blended system is computed by the same code
and with the same intervals as any candidate's (:func:`kit.analysis.slices.slice_table`:
Clopper–Pearson, Tango / Tang paired score intervals against the baseline, paired BCa).

System figures per request: the small model is always paid; a fallback request pays the
small *and* the large model, one after the other, so its latency is the sum of both measured
latencies of that request (:mod:`kit.routing.costs`), and the blended p95 latency is the
order-statistic interval of the p95 of that mixture (:func:`kit.stats.intervals.quantile_ci`).

=========================  =================================================================
figure                     interval
=========================  =================================================================
``fallback_rate``          Clopper–Pearson on routed requests / requests
``blended_latency_p95_ms`` order statistics of the per-request blended latencies
``blended_cost_per_request`` BCa bootstrap of the per-request blended cost (mean)
``routing_cost_saving``    BCa bootstrap (paired, per request) of 1 - blended / large-only
=========================  =================================================================

Curves: :func:`deferral_curve` sweeps the policy's confidence threshold over the small
model's observed confidences (every distinct value up to ``max_points``); the oracle routes
exactly the requests the small model gets wrong and the large one gets right; the area
summary :func:`apgr` is RouteLLM's *average performance gap recovered* (Ong et al. 2024):
the mean over fallback rates in [0, 1] of (quality - small) / (large - small).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kit.analysis.compare import RESULT_COLUMNS
from kit.analysis.slices import slice_table
from kit.budget.grammar import LABEL_SLICES
from kit.errors import CompkitError
from kit.stats.intervals import proportion_ci, quantile_ci

KEY = ["item_id", "repeat"]
#: Columns of :func:`system_figures` / the curve's system part.
SYSTEM_COLUMNS = [
    "n",
    "fallback_rate",
    "fallback_ci_low",
    "fallback_ci_high",
    "latency_p95_ms",
    "latency_p95_ci_low",
    "latency_p95_ci_high",
    "cost_per_request",
    "cost_ci_low",
    "cost_ci_high",
    "cost_unit",
    "cost_saving",
    "saving_ci_low",
    "saving_ci_high",
]


def routed_name(small: str) -> str:
    """The evidence name of the routed system built on ``small``."""
    return f"{small}+router"


@dataclass(frozen=True)
class Pairing:
    """The small and the fallback model's rows of the same requests, aligned."""

    small: str
    large: str
    baseline: str
    outcomes: pd.DataFrame  # every model's outcome rows on these requests
    signals: pd.DataFrame  # the small model's, aligned with ``keys``
    keys: pd.DataFrame  # item_id, repeat
    small_latency: np.ndarray
    large_latency: np.ndarray
    small_cost: np.ndarray
    large_cost: np.ndarray
    cost_unit: str

    def subset(self, items: Sequence[str] | None) -> Pairing:
        """The pairing restricted to ``items`` (ids; None: all)."""
        if items is None:
            return self
        wanted = set(map(str, items))
        mask = self.keys["item_id"].astype(str).isin(wanted).to_numpy()
        keep = self.outcomes["item_id"].astype(str).isin(wanted)
        return Pairing(
            self.small,
            self.large,
            self.baseline,
            self.outcomes[keep].reset_index(drop=True),
            self.signals[mask].reset_index(drop=True),
            self.keys[mask].reset_index(drop=True),
            self.small_latency[mask],
            self.large_latency[mask],
            self.small_cost[mask],
            self.large_cost[mask],
            self.cost_unit,
        )


def pair_models(
    outcomes: pd.DataFrame,
    signals: pd.DataFrame,
    costs: pd.DataFrame,
    *,
    small: str,
    large: str,
    baseline: str,
) -> Pairing:
    """Align the small model's signals with both models' latency and cost per request.

    Raises
    ------
    CompkitError
        When the two models do not share the same requests (``item_id, repeat``).
    """
    keys = signals[KEY].astype({"item_id": str}).reset_index(drop=True)
    lat = {}
    for model in (small, large):
        mine = costs[costs["model"] == model].astype({"item_id": str})
        merged = keys.merge(mine, on=KEY, how="left", validate="one_to_one")
        if merged["latency_s"].isna().any():
            missing = merged.loc[merged["latency_s"].isna(), "item_id"].head(3).tolist()
            raise CompkitError(
                f"model {model!r} has no measured request for {int(merged['latency_s'].isna().sum())}"
                f" of {small!r}'s requests (e.g. items {missing}); routing needs both models "
                "on the same items and repeats"
            )
        lat[model] = merged
    priced = all(np.isfinite(lat[m]["cost_usd"].to_numpy(dtype=float)).all() for m in lat)
    unit = "USD" if priced else "compute_s"
    cost = {
        m: (f["cost_usd"] if priced else f["latency_s"]).to_numpy(dtype=float)
        for m, f in lat.items()
    }
    want = outcomes["model"].isin([small, large, baseline])
    frame = outcomes[want].astype({"item_id": str})
    frame = frame[frame.set_index(KEY).index.isin(keys.set_index(KEY).index)]
    for model in (small, large):
        have = frame[frame["model"] == model]
        if len(have) != len(keys):
            raise CompkitError(
                f"model {model!r} has {len(have)} outcome rows on the {len(keys)} requests "
                f"of {small!r}; routing needs both models on the same items and repeats"
            )
    return Pairing(
        small,
        large,
        baseline,
        frame.reset_index(drop=True),
        signals.reset_index(drop=True),
        keys,
        lat[small]["latency_s"].to_numpy(dtype=float),
        lat[large]["latency_s"].to_numpy(dtype=float),
        cost[small],
        cost[large],
        unit,
    )


def blended_outcomes(pairing: Pairing, routed: np.ndarray, *, name: str) -> pd.DataFrame:
    """Outcome rows of the routed system ``name``: the fallback's where ``routed``, else the
    small model's (same columns as ``outcomes.parquet``, plus ``routed``)."""
    routed = np.asarray(routed, dtype=bool)
    if routed.shape != (len(pairing.keys),):
        raise CompkitError(f"routed has shape {routed.shape}, expected ({len(pairing.keys)},)")
    decision = pairing.keys.assign(routed=routed)
    small = pairing.outcomes[pairing.outcomes["model"] == pairing.small]
    large = pairing.outcomes[pairing.outcomes["model"] == pairing.large]
    small = small.merge(decision, on=KEY, validate="one_to_one")
    large = large.merge(decision, on=KEY, validate="one_to_one")
    out = pd.concat([small[~small["routed"]], large[large["routed"]]], ignore_index=True)
    return out.assign(model=name).sort_values(KEY, kind="stable").reset_index(drop=True)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _saving(cost: np.ndarray, big: np.ndarray, axis: int = -1) -> np.ndarray:
    """1 - mean blended cost / mean large-only cost (paired per request)."""
    return 1.0 - np.mean(cost, axis=axis) / np.mean(big, axis=axis)


def _bca(stat, data: tuple[np.ndarray, ...], confidence: float, seed: int) -> tuple[float, float]:
    import warnings

    from scipy.stats import bootstrap

    if len(data[0]) < 2 or all(np.all(d == d[0]) for d in data):
        v = float(stat(*data))
        return v, v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples: handled below
        res = bootstrap(
            data,
            stat,
            paired=True,
            vectorized=True,
            confidence_level=confidence,
            n_resamples=999,
            method="BCa",
            random_state=np.random.default_rng(seed),
        )
    low, high = res.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        low, high = np.quantile(
            res.bootstrap_distribution, [(1 - confidence) / 2, (1 + confidence) / 2]
        )
    return float(low), float(high)


def system_figures(
    pairing: Pairing,
    routed: np.ndarray,
    *,
    confidence: float = 0.95,
    seed: int = 0,
    large_only: bool = False,
) -> dict[str, float | str]:
    """Fallback rate, blended p95 latency, blended cost and saving, each with its interval
    (:data:`SYSTEM_COLUMNS`). ``large_only``: the large model answering every request itself
    (no small model in front; ``routed`` is ignored)."""
    routed = np.asarray(routed, dtype=bool)
    n = int(routed.size)
    if large_only:
        routed = np.zeros(n, bool)
        latency = pairing.large_latency * 1000.0
        cost = pairing.large_cost.copy()
    else:
        latency = (pairing.small_latency + routed * pairing.large_latency) * 1000.0
        cost = pairing.small_cost + routed * pairing.large_cost
    k = int(routed.sum())
    fb_low, fb_high = proportion_ci(k, n, confidence=confidence)
    p95, p_low, p_high = quantile_ci(latency, 0.95, confidence=confidence)
    mean = float(cost.mean()) if n else float("nan")
    c_low, c_high = _bca(_mean, (cost,), confidence, seed) if n else (np.nan, np.nan)
    big = pairing.large_cost
    s_est = float(_saving(cost, big)) if n and big.sum() > 0 else float("nan")
    ok = n > 1 and big.sum() > 0
    s_low, s_high = _bca(_saving, (cost, big), confidence, seed + 1) if ok else (np.nan, np.nan)
    return dict(
        zip(
            SYSTEM_COLUMNS,
            [
                n,
                k / n if n else np.nan,
                float(fb_low),
                float(fb_high),
                p95,
                p_low,
                p_high,
                mean,
                c_low,
                c_high,
                pairing.cost_unit,
                s_est,
                s_low,
                s_high,
            ],
            strict=True,
        )
    )


def budget_rows(
    outcomes: pd.DataFrame,
    slices: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str],
    slice_columns: Sequence[str],
    metrics: Sequence[str] | None,
    confidence: float,
    n_resamples: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Evidence rows (:data:`RESULT_COLUMNS`) of ``candidates`` against the baseline: every
    metric overall and per slice value, and ``recall`` on label slices (as stage 3)."""
    table = slice_table(
        outcomes,
        slices,
        baseline=baseline,
        candidates=list(candidates),
        slice_columns=list(slice_columns),
        metrics=metrics,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    recall = table[(table["metric"] == "accuracy") & table["slice"].isin(LABEL_SLICES)]
    return pd.concat([table, recall.assign(metric="recall")], ignore_index=True)


def threshold_grid(confidences: np.ndarray, *, max_points: int = 41) -> np.ndarray:
    """Thresholds to sweep: 0, every distinct observed confidence (thinned to ``max_points``
    by quantiles) and just above the largest (everything routed by confidence)."""
    x = np.unique(confidences[np.isfinite(confidences)])
    if x.size > max_points - 2:
        x = np.unique(np.quantile(x, np.linspace(0, 1, max_points - 2), method="nearest"))
    top = np.nextafter(x[-1], np.inf) if x.size else 1.0
    return np.unique(np.concatenate([[0.0], x, [min(1.0, top) if top <= 1 else top]]))


def oracle_curve(pairing: Pairing, *, metric: str = "correct") -> pd.DataFrame:
    """The best any router could do: route first the requests where the small model is wrong
    and the large one right. Columns ``fallback_rate, value``."""
    o = pairing.outcomes
    s = pairing.keys.merge(o[o["model"] == pairing.small][[*KEY, metric]], on=KEY)[metric]
    g = pairing.keys.merge(o[o["model"] == pairing.large][[*KEY, metric]], on=KEY)[metric]
    s, g = s.to_numpy(dtype=float), g.to_numpy(dtype=float)
    n = s.size
    gain = np.sort(np.nan_to_num(g - s))[::-1]  # largest gains first
    values = s.mean() + np.concatenate([[0.0], np.cumsum(gain)]) / n
    return pd.DataFrame({"fallback_rate": np.arange(n + 1) / n, "value": values})


def apgr(curve: pd.DataFrame, *, small: float, large: float) -> float:
    """Average performance gap recovered: the area under (value - small) / (large - small)
    over fallback rates 0..1 (the curve closed by small-only at 0 and large-only at 1).
    NaN when the large model is no better than the small one (no gap to recover)."""
    if not np.isfinite(small) or not np.isfinite(large) or large - small <= 1e-12:
        return float("nan")
    pts = curve[["fallback_rate", "value"]].dropna().sort_values("fallback_rate")
    x = np.concatenate([[0.0], pts["fallback_rate"].to_numpy(), [1.0]])
    y = np.concatenate([[small], pts["value"].to_numpy(), [large]])
    order = np.argsort(x, kind="stable")
    x, y = x[order], (y[order] - small) / (large - small)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def evidence_row(
    model: str,
    metric: str,
    value: float,
    low: float,
    high: float,
    *,
    n: int,
    method: str,
    confidence: float,
    note: str = "",
    baseline_value: float = float("nan"),
) -> dict:
    """One aggregate evidence row (:data:`RESULT_COLUMNS`) with a value interval only."""
    row = dict.fromkeys(RESULT_COLUMNS, np.nan)
    row.update(
        model=model,
        slice="overall",
        slice_value="all",
        metric=metric,
        n=n,
        value=value,
        value_ci_low=low,
        value_ci_high=high,
        value_method=method,
        confidence=confidence,
        baseline_value=baseline_value,
        note=note,
    )
    return row


def cascade_system(
    outcomes: pd.DataFrame,
    signals: dict[str, pd.DataFrame],
    costs: pd.DataFrame,
    cascade,
    *,
    name: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cascade over more than two models (:class:`kit.routing.policies.Cascade`) simulated
    from per-item outcomes: ``(outcomes of the system, per-request figures)``.

    Each request is answered by ``models[0]``; step ``k``'s policy reads model ``k``'s
    signals and passes it on; the request pays the latency and cost of every model it reached.
    The figures frame has ``item_id, repeat, stage, served_by, latency_s, cost``; ``cost`` is
    in USD when every model has a price, else in model seconds.

    Raises
    ------
    CompkitError
        When a model lacks signals, outcomes or measured requests for the first model's
        requests.
    """
    models = list(cascade.models)
    keys = signals[models[0]][KEY].astype({"item_id": str}).reset_index(drop=True)
    aligned = {}
    for m in models[:-1]:
        aligned[m] = keys.merge(signals[m].astype({"item_id": str}), on=KEY, how="left")
    stage = cascade.final_stage(aligned)
    lat, price = np.zeros(len(keys)), np.zeros(len(keys))
    priced = bool(np.isfinite(costs["cost_usd"].to_numpy(dtype=float)).all())
    served = []
    for k, m in enumerate(models):
        mine = keys.merge(costs[costs["model"] == m].astype({"item_id": str}), on=KEY, how="left")
        if mine["latency_s"].isna().any():
            raise CompkitError(f"cascade: model {m!r} lacks measured requests for some items")
        reached = stage >= k
        lat += reached * mine["latency_s"].to_numpy(dtype=float)
        price += reached * (mine["cost_usd"] if priced else mine["latency_s"]).to_numpy(float)
        rows = outcomes[outcomes["model"] == m].astype({"item_id": str})
        pick = keys[stage == k].merge(rows, on=KEY, how="left", validate="one_to_one")
        if pick["correct"].isna().any():
            raise CompkitError(f"cascade: model {m!r} lacks outcomes for some items")
        served.append(pick)
    system = pd.concat(served, ignore_index=True).assign(model=name)
    figures = keys.assign(
        stage=stage,
        served_by=[models[s] for s in stage],
        latency_s=lat,
        cost=price,
    )
    return system.sort_values(KEY, kind="stable").reset_index(drop=True), figures
