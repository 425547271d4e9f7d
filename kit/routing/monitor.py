"""Does the router keep its promise after launch? The chosen rule against a later request log.

:func:`monitor_log` compares a request log (:func:`kit.routing.client.read_log`: the live
router's JSONL, or any file with its fields) with what stage 6 measured on the judged items:

``fallback_rate``       the log's share of routed requests against the judged items'
                        (difference interval: union of two Clopper–Pearson intervals at
                        ``1 - alpha/2`` each); drifted when it excludes 0
``rule_agreement``      the chosen rule re-applied to the log's own signals against what the
                        deployed router did; drifted when any request disagrees (the
                        deployment does not run the rule that was judged)
``confidence_shift``    the small model's confidence distribution, two-sample
                        Kolmogorov–Smirnov test (scipy) against the judged items'; drifted
                        when p < alpha; ``psi`` (population stability index over the
                        reference deciles) is reported alongside
``accuracy``            the blended accuracy on the log's labelled requests (``correct`` not
                        null) against the routed system's on the judged items; drifted when
                        the difference interval excludes 0

Rows: :data:`MONITOR_COLUMNS`. ``compkit monitor RUN --log FILE`` prints them and exits 1 when
anything drifted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kit.errors import CompkitError

MONITOR_COLUMNS = [
    "check",
    "reference",
    "observed",
    "n_reference",
    "n_observed",
    "ci_low",
    "ci_high",
    "p_value",
    "drifted",
    "note",
]


def _psi(ref: np.ndarray, obs: np.ndarray) -> float:
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)))
    if edges.size < 3:
        return float("nan")
    edges[0], edges[-1] = -np.inf, np.inf
    r = np.histogram(ref, edges)[0] / ref.size
    o = np.histogram(obs, edges)[0] / obs.size
    r, o = np.clip(r, 1e-4, None), np.clip(o, 1e-4, None)
    return float(np.sum((o - r) * np.log(o / r)))


def _row(check, ref, obs, n_ref, n_obs, low=np.nan, high=np.nan, p=np.nan, drift=False, note=""):
    return dict(
        zip(
            MONITOR_COLUMNS,
            [check, ref, obs, n_ref, n_obs, low, high, p, bool(drift), note],
            strict=True,
        )
    )


def _reference(run, candidate: str):
    """The judged items' signals, routed decisions and the routed system's accuracy."""
    from kit.routing.signals import build_signals
    from kit.routing.simulate import routed_name
    from kit.routing.verify import _policy, judged_items

    config = run.study.routing
    if config is None:
        raise CompkitError(f"{run.root}: the frozen study has no routing: block")
    policy = _policy(run, candidate, config)
    sig = build_signals(
        run.outputs([candidate]),
        run.outcomes(),
        model=candidate,
        slices=run.slices(),
        quantile=config.token_quantile,
    )
    sig = sig[sig["item_id"].astype(str).isin(judged_items(run, candidate))]
    ev = run.table("routing_evidence")
    acc = ev[
        (ev["model"] == routed_name(candidate))
        & (ev["metric"] == "accuracy")
        & (ev["slice"] == "overall")
    ]
    return policy, sig.reset_index(drop=True), acc.iloc[0]


def monitor_log(run, *, log: str | Path | pd.DataFrame, candidate: str | None = None):
    """The drift checks of a request log against stage 6 (module docstring).

    Raises
    ------
    CompkitError
        The run was not routed, the candidate is unknown, or the log lacks the fields the
        rule reads (``routed`` and the rule's confidence signal).
    """
    from kit.routing.client import read_log
    from kit.routing.policies import confidence_signal
    from kit.run import Run

    run = Run.open(run)
    if not run.has_table("routing_rules"):
        raise CompkitError(f"{run.root}: stage 6 (routing) has not run; nothing to monitor")
    names = list(run.table("routing_rules")["candidate"])
    candidate = candidate or names[0]
    if candidate not in names:
        raise CompkitError(f"candidate {candidate!r} was not routed; routed: {names}")
    frame = log if isinstance(log, pd.DataFrame) else read_log(log)
    policy, ref, acc = _reference(run, candidate)
    signal = confidence_signal(policy)
    missing = [c for c in ("routed", signal) if c not in frame.columns]
    if missing:
        raise CompkitError(f"request log lacks field(s) {missing} that the routing rule reads")
    level = run.confidence
    rows = _routing_checks(frame, policy, ref, level)
    shift = _confidence_check(ref, frame, signal, level)
    rows += [shift] if shift is not None else []
    rows.append(_quality(frame, acc, level))
    return pd.DataFrame(rows, columns=MONITOR_COLUMNS)


def _routing_checks(frame: pd.DataFrame, policy, ref: pd.DataFrame, level: float) -> list[dict]:
    """Fallback rate against the judged items, and the rule re-applied to the log."""
    from kit.stats.serving_intervals import independent_proportion_difference_ci

    ref_routed = policy.route(ref)
    obs_routed = frame["routed"].astype(bool).to_numpy()
    k1, n1, k2, n2 = int(obs_routed.sum()), len(obs_routed), int(ref_routed.sum()), len(ref)
    lo, hi = independent_proportion_difference_ci(k1, n1, k2, n2, confidence=level)
    rows = [
        _row(
            "fallback_rate",
            k2 / n2,
            k1 / n1,
            n2,
            n1,
            lo,
            hi,
            drift=lo > 0 or hi < 0,
            note="log - judged items; interval of the difference",
        )
    ]
    again = policy.route(_signals_of(frame, policy))
    disagree = int((again != obs_routed).sum())
    rows.append(
        _row(
            "rule_agreement",
            1.0,
            1 - disagree / n1,
            n2,
            n1,
            drift=disagree > 0,
            note=f"{disagree} request(s) routed otherwise than the judged rule would",
        )
    )
    return rows


def _confidence_check(ref: pd.DataFrame, frame: pd.DataFrame, signal: str, level: float):
    """Two-sample Kolmogorov–Smirnov test of the confidence distributions (None: no values)."""
    from scipy.stats import ks_2samp

    alpha = 1 - level
    r = ref[signal].to_numpy(dtype=float)
    o = pd.to_numeric(frame[signal], errors="coerce").to_numpy(dtype=float)
    r, o = r[np.isfinite(r)], o[np.isfinite(o)]
    if r.size and o.size:
        test = ks_2samp(r, o)
        return _row(
            "confidence_shift",
            float(np.median(r)),
            float(np.median(o)),
            r.size,
            o.size,
            p=float(test.pvalue),
            drift=test.pvalue < alpha,
            note=f"medians; KS D = {test.statistic:.3f}, PSI = {_psi(r, o):.3f}",
        )
    return None


def _signals_of(frame: pd.DataFrame, policy) -> pd.DataFrame:
    """The log as a signals frame: flags it lacks are False, a missing confidence NaN (which
    routes), a missing slice column no value."""
    out = frame.copy()
    for column in policy_columns(policy):
        if column in ("parse_failed", "abstained"):
            out[column] = out[column].fillna(False) if column in out else False
        elif column not in out:
            out[column] = np.nan
    return out


def policy_columns(policy) -> list[str]:
    """Signal columns the policy reads (the log must carry them to re-apply the rule)."""
    parts = getattr(policy, "parts", (policy,))
    out = []
    for p in parts:
        if hasattr(p, "signal"):
            out.append(p.signal)
        elif p.kind == "parse_failure":
            out.append("parse_failed")
        elif p.kind == "abstention":
            out.append("abstained")
        elif p.kind == "slice":
            out.append(p.column)
    return out


def _quality(frame: pd.DataFrame, acc: pd.Series, level: float) -> dict:
    from kit.stats.serving_intervals import independent_proportion_difference_ci

    n_ref = int(acc["n"])
    if "correct" not in frame.columns:
        return _row(
            "accuracy",
            float(acc["value"]),
            np.nan,
            n_ref,
            0,
            note="no labelled requests in the log",
        )
    labelled = pd.to_numeric(frame["correct"], errors="coerce").dropna()
    if labelled.empty:
        return _row(
            "accuracy",
            float(acc["value"]),
            np.nan,
            n_ref,
            0,
            note="no labelled requests in the log",
        )
    k1, n1 = int(np.rint(labelled.sum())), len(labelled)
    k2 = int(np.rint(float(acc["value"]) * n_ref))
    lo, hi = independent_proportion_difference_ci(k1, n1, k2, n_ref, confidence=level)
    return _row(
        "accuracy",
        float(acc["value"]),
        k1 / n1,
        n_ref,
        n1,
        lo,
        hi,
        drift=lo > 0 or hi < 0,
        note="labelled requests of the log - judged items",
    )
