"""Prediction distributions of a candidate against the baseline: pure compute on frames.

Token level (llama.cpp ``--kl-divergence`` style)
--------------------------------------------------
From the teacher-forced rows of :mod:`kit.teacher_forcing` (which tokens and positions: see
there). At each position the baseline's distribution P is known on its top-k tokens S (the
kept logprobs, ``p_k`` the smallest of them) and the candidate's Q on the same tokens; the
rest is the tail, ``P(tail) = 1 - P(S)``, ``Q(tail) = 1 - Q(S)``. Then

    KL(P || Q) = sum_{v in S} p_v log(p_v / q_v) + sum_{v not in S} p_v log(p_v / q_v)

and the tail term is bounded on both sides:

* from below by ``P(tail) log(P(tail) / Q(tail))`` (the log-sum inequality: merging the tail
  into one outcome can only lose divergence). ``kl`` is this lower bound, the KL between P
  and Q coarse-grained to S plus one tail outcome; it is exact when P(tail) = 0.
* from above by ``P(tail) (log p_k - log q_min)``: every tail token has ``p_v <= p_k`` and
  ``q_v >= q_min`` (the candidate's smallest probability over the vocabulary, recorded).
  ``kl_upper`` adds this bound instead; ``kl_upper - kl`` is what the truncation can hide.

Statistics follow llama.cpp's names: mean KL and its standard deviation and standard error,
percentiles 99.9 / 99 / 95 / 90 / median / 10 / 5 / 1 / 0.1 over tokens, maximum and
minimum; ``Δp`` of the reference token (the baseline's next token: ``q(t) - p(t)``), its
percentiles and RMS; the share of positions with the same top token. They are descriptive
(tokens of one answer are not independent). The evidence a budget judges
(``mean_token_kl``, ``same_top_token_rate``, ``reference_token_delta_p``) has intervals from
a studentized bootstrap over *items* (:func:`kit.stats.bootstrap.cluster_bootstrap`; the KL on
the log scale), from :data:`kit.metrics.BOOTSTRAP_MIN_N` items on.

Item level
----------
``choice_kl`` / ``choice_js``: per choice item the KL and Jensen–Shannon divergence between
the normalized option probabilities; means with log-scale bootstrap-t intervals over items.

Distribution shifts (p-values; :func:`distribution_shift`)
----------------------------------------------------------
Predicted labels (classification labels, multiple-choice options): Stuart–Maxwell's test of
marginal homogeneity on the paired baseline x candidate table (a chi-square test that is
valid for paired predictions) and, for reference, the G-test on the two marginal counts,
which treats them as independent samples (conservative for positively correlated pairs).
Confidence and output length: Kolmogorov–Smirnov and Anderson–Darling on the two samples
(same caveat), and the paired Wilcoxon signed-rank test. Caveats: the share of the
baseline's answers with a caveat ("please note", "however", "I'm not sure", ...) that the
candidate drops, with a Clopper–Pearson interval.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from kit.analysis.compare import OVERALL, RESULT_COLUMNS
from kit.errors import CompkitError
from kit.metrics import BOOTSTRAP_MIN_N
from kit.stats.bootstrap import cluster_bootstrap, zero_change_bound
from kit.stats.intervals import proportion_ci

#: Token-KL percentiles llama.cpp prints (as fractions).
PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001)
POSITION_COLUMNS = [
    "model",
    "item_id",
    "position",
    "kl",
    "kl_upper",
    "p_tail",
    "same_top",
    "p_target",
    "q_target",
    "delta_p",
]
SHIFT_COLUMNS = [
    "model",
    "quantity",
    "test",
    "statistic",
    "p_value",
    "n",
    "effect",
    "effect_name",
    "paired",
    "note",
]
CAVEAT = re.compile(
    r"\b(please note|note that|however|keep in mind|be aware|i'?m not sure|i am not sure|"
    r"not certain|may vary|please check|please verify|please consult|consult (?:a|an|your)|"
    r"i recommend|it depends|depending on|unfortunately|i'?m sorry|i am sorry|i cannot|"
    r"i can'?t)\b",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- token KL


def _tail(logprobs: np.ndarray) -> np.ndarray:
    """1 - sum(exp(logprobs)) per row, accurate for tiny tails (expm1 of the logsumexp)."""
    m = np.max(logprobs, axis=1, keepdims=True)
    lse = (m + np.log(np.sum(np.exp(logprobs - m), axis=1, keepdims=True)))[:, 0]
    return np.clip(-np.expm1(np.minimum(lse, 0.0)), 0.0, 1.0)


def _matrix(rows: Sequence, dtype) -> np.ndarray:
    """A positions x k array from a list of rows (parquet gives arrays of arrays)."""
    if len(rows) == 0:
        return np.zeros((0, 0), dtype=dtype)
    return np.stack([np.asarray(r, dtype=dtype) for r in rows])


def position_divergence(
    base: Mapping[str, Sequence], cand: Mapping[str, Sequence]
) -> dict[str, np.ndarray]:
    """Per position of one item: ``kl`` (lower bound), ``kl_upper``, ``p_tail``, ``same_top``,
    ``p_target``, ``q_target``, ``delta_p`` (NaN where either model's logits were not finite).

    ``base`` and ``cand`` are stored rows of :mod:`kit.teacher_forcing` for the same item;
    the candidate's support must be the baseline's top-k.
    """
    ids_b = _matrix(base["support_ids"], np.int64)
    ids_c = _matrix(cand["support_ids"], np.int64)
    if ids_b.shape != ids_c.shape or not np.array_equal(ids_b, ids_c):
        raise CompkitError(
            f"item {base.get('item_id')!r}: the candidate was not scored on the baseline's "
            "top-k tokens (rerun the candidate)"
        )
    p = _matrix(base["support_logprobs"], np.float64)
    q = _matrix(cand["support_logprobs"], np.float64)
    bad = (np.asarray(base["nonfinite"]) > 0) | (np.asarray(cand["nonfinite"]) > 0)
    bad |= ~np.isfinite(p).all(axis=1) | ~np.isfinite(q).all(axis=1)
    p, q = np.where(bad[:, None], -1.0, p), np.where(bad[:, None], -1.0, q)
    pt, qt = _tail(p), _tail(q)
    kl_s = np.sum(np.exp(p) * (p - q), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        coarse = np.where(pt > 0, pt * (np.log(pt) - np.log(np.maximum(qt, 1e-300))), 0.0)
    q_min = np.asarray(cand["min_logprobs"], dtype=np.float64)
    bound = pt * np.maximum(p.min(axis=1) - np.where(np.isfinite(q_min), q_min, 0.0), 0.0)
    kl = np.maximum(kl_s + coarse, 0.0)
    p_target = np.exp(np.asarray(base["target_logprobs"], dtype=np.float64))
    q_target = np.exp(np.asarray(cand["target_logprobs"], dtype=np.float64))
    out = {
        "kl": kl,
        "kl_upper": np.maximum(kl_s + bound, kl),
        "p_tail": pt,
        "same_top": (np.asarray(base["argmax_ids"]) == np.asarray(cand["argmax_ids"])).astype(
            float
        ),
        "p_target": p_target,
        "q_target": q_target,
        "delta_p": q_target - p_target,
    }
    return {k: np.where(bad, np.nan, v) for k, v in out.items()}


def token_divergence(distributions: Mapping[str, pd.DataFrame], *, baseline: str) -> pd.DataFrame:
    """Every scored position of every candidate (:data:`POSITION_COLUMNS`).

    ``distributions`` maps a model name to its stored rows (``Run.distributions``); the
    baseline's rows are the reference, a candidate's item without a baseline row is skipped.
    """
    if baseline not in distributions:
        raise CompkitError(f"no token distributions for the baseline {baseline!r}")
    base = {r["item_id"]: r for r in distributions[baseline].to_dict("records") if not r["error"]}
    frames = []
    for model, rows in distributions.items():
        if model == baseline:
            continue
        for rec in rows.to_dict("records"):
            if rec["error"] or rec["item_id"] not in base:
                continue
            values = position_divergence(base[rec["item_id"]], rec)
            n = len(values["kl"])
            frames.append(
                pd.DataFrame(
                    {"model": model, "item_id": rec["item_id"], "position": np.arange(n), **values}
                )
            )
    if not frames:
        return pd.DataFrame(columns=POSITION_COLUMNS)
    return pd.concat(frames, ignore_index=True)[POSITION_COLUMNS]


def kl_statistics(positions: pd.DataFrame) -> pd.DataFrame:
    """llama.cpp-style statistics per candidate, long: ``model, statistic, value``.

    Statistics: ``positions``, ``items``, ``nonfinite_positions``, ``mean_kl``, ``sd_kl``,
    ``se_kl`` (sd / sqrt(positions), llama.cpp's ±), ``max_kl``, ``kl_p99.9`` ...
    ``kl_p0.1``, ``min_kl``, ``mean_kl_upper`` and ``max_kl_gap`` (what the top-k truncation
    can hide), ``mean_p_tail``, ``mean_delta_p``, ``sd_delta_p``, ``delta_p_p99.9`` ...,
    ``rms_delta_p``, ``same_top``, ``se_same_top``.
    """
    rows = []
    for model, part in positions.groupby("model", sort=False):
        ok = part.dropna(subset=["kl"])
        n = len(ok)
        kl, dp, same = ok["kl"].to_numpy(), ok["delta_p"].to_numpy(), ok["same_top"].to_numpy()
        stats: dict[str, float] = {
            "positions": n,
            "items": ok["item_id"].nunique(),
            "nonfinite_positions": len(part) - n,
        }
        if n:
            stats |= _describe("kl", kl)
            stats |= {
                "mean_kl_upper": float(ok["kl_upper"].mean()),
                "max_kl_gap": float((ok["kl_upper"] - ok["kl"]).max()),
                "mean_p_tail": float(ok["p_tail"].mean()),
            }
            stats |= _describe("delta_p", dp)
            stats |= {
                "rms_delta_p": float(np.sqrt(np.mean(dp**2))),
                "same_top": float(same.mean()),
                "se_same_top": float(np.sqrt(same.mean() * (1 - same.mean()) / max(n - 1, 1))),
            }
        rows += [{"model": model, "statistic": k, "value": float(v)} for k, v in stats.items()]
    return pd.DataFrame(rows, columns=["model", "statistic", "value"])


def _describe(name: str, x: np.ndarray) -> dict[str, float]:
    sd = float(np.std(x, ddof=1)) if x.size > 1 else math.nan
    out = {
        f"mean_{name}": float(np.mean(x)),
        f"sd_{name}": sd,
        f"se_{name}": sd / math.sqrt(x.size) if x.size > 1 else math.nan,
        f"max_{name}": float(np.max(x)),
    }
    for q in PERCENTILES:
        out[f"{name}_p{q * 100:g}"] = float(np.quantile(x, q))
    out[f"min_{name}"] = float(np.min(x))
    return out


def kl_percentiles(positions: pd.DataFrame) -> pd.DataFrame:
    """``model, percentile, kl, kl_upper`` at every :data:`PERCENTILES` (for the chart)."""
    rows = []
    for model, part in positions.dropna(subset=["kl"]).groupby("model", sort=False):
        for q in sorted(PERCENTILES):
            rows.append(
                {
                    "model": model,
                    "percentile": q * 100,
                    "kl": float(np.quantile(part["kl"], q)),
                    "kl_upper": float(np.quantile(part["kl_upper"], q)),
                }
            )
    return pd.DataFrame(rows, columns=["model", "percentile", "kl", "kl_upper"])


def item_divergence(positions: pd.DataFrame) -> pd.DataFrame:
    """Per candidate and item: ``n_positions, kl_sum, kl_mean, kl_max, kl_upper_sum,
    same_top_sum, delta_p_sum`` over its finite positions."""
    ok = positions.dropna(subset=["kl"])
    grouped = ok.groupby(["model", "item_id"], sort=True)
    out = grouped.agg(
        n_positions=("kl", "size"),
        kl_sum=("kl", "sum"),
        kl_mean=("kl", "mean"),
        kl_max=("kl", "max"),
        kl_upper_sum=("kl_upper", "sum"),
        same_top_sum=("same_top", "sum"),
        delta_p_sum=("delta_p", "sum"),
    )
    return out.reset_index()


# --------------------------------------------------------------------------- evidence

#: metric -> (per-item sum column, the baseline's value against itself, bootstrap-t scale)
_TOKEN_METRICS = {
    "mean_token_kl": ("kl_sum", 0.0, "log"),
    "same_top_token_rate": ("same_top_sum", 1.0, "linear"),
    "reference_token_delta_p": ("delta_p_sum", 0.0, "linear"),
}


def token_evidence(
    items: pd.DataFrame,
    *,
    slices: pd.DataFrame | None = None,
    slice_columns: Sequence[str] = (),
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Evidence rows of the token metrics per candidate, overall and per slice value.

    ``value`` is the token-weighted mean (sum over items / positions), its interval the BCa
    bootstrap over items; ``baseline_value`` is the baseline against itself (KL 0, same top
    token 1, Δp 0), so ``delta`` is the value minus it, with the same interval shifted.
    """
    rows = []
    for model, part in items.groupby("model", sort=False):
        merged = _with_slices(part, slices, slice_columns)
        for metric, (column, self_value, scale) in _TOKEN_METRICS.items():
            for slice_name, groups in [(OVERALL[0], None), *((c, c) for c in slice_columns)]:
                sub = merged if groups is None else merged.dropna(subset=[groups])
                if sub.empty:
                    continue
                boot = cluster_bootstrap(
                    sub[column].to_numpy(),
                    sub["n_positions"].to_numpy(),
                    groups=None if groups is None else sub[groups].astype(str).to_numpy(),
                    n_resamples=n_resamples,
                    confidence=confidence,
                    seed=seed,
                    scale=scale,
                )
                if groups is not None:
                    boot = boot[boot["group"] != "all"]
                flat = _flat_groups(sub, column, groups)
                for r in boot.to_dict("records"):
                    value = OVERALL[1] if groups is None else r["group"]
                    r["level"] = confidence
                    rows.append(
                        _value_row(
                            model,
                            metric,
                            slice_name,
                            value,
                            r,
                            self_value,
                            "cluster_bootstrap_t",
                            flat=flat.get(value, False),
                        )
                    )
    return _evidence_frame(rows, confidence)


def _flat_groups(sub: pd.DataFrame, column: str, groups: str | None) -> dict[str, bool]:
    """Per slice value: whether every item's per-position mean is the same (no variation)."""
    per_item = sub[column] / sub["n_positions"]
    keys = pd.Series(OVERALL[1], index=sub.index) if groups is None else sub[groups].astype(str)
    return {k: bool(v.nunique() <= 1) for k, v in per_item.groupby(keys)}


def _with_slices(part: pd.DataFrame, slices: pd.DataFrame | None, columns: Sequence[str]):
    if slices is None or not columns:
        return part
    return part.join(slices.set_index("id")[list(columns)], on="item_id")


#: Ranges of the bounded token metrics (an unchanged sample is bounded exactly inside them).
_BOUNDED = {"same_top_token_rate": (0.0, 1.0), "reference_token_delta_p": (-1.0, 1.0)}


def _value_row(model, metric, slice_name, slice_value, r, self_value, method, flat=False) -> dict:
    small = r["n"] < BOOTSTRAP_MIN_N
    lo, hi = (math.nan, math.nan) if small else (r["ci_low"], r["ci_high"])
    note = (
        f"fewer than {BOOTSTRAP_MIN_N} items: a bootstrap interval is not trusted here"
        if small
        else ""
    )
    if flat and metric in _BOUNDED and r["estimate"] == self_value:
        # no item differs from the baseline: bound the share of items that could (exact)
        low_end, high_end = _BOUNDED[metric]
        width = (high_end - low_end) * float(zero_change_bound(r["n"], confidence=r["level"]))
        lo, hi = max(low_end, r["estimate"] - width), min(high_end, r["estimate"] + width)
        method, note = "bounded_zero_change", "no item differed from the baseline"
    return {
        "model": model,
        "slice": slice_name,
        "slice_value": str(slice_value),
        "metric": metric,
        "n": r["n"],
        "value": r["estimate"],
        "value_ci_low": lo,
        "value_ci_high": hi,
        "baseline_value": self_value,
        "delta": r["estimate"] - self_value,
        "ci_low": lo - self_value,
        "ci_high": hi - self_value,
        "value_method": method,
        "delta_method": method,
        "note": note,
    }


def _evidence_frame(rows: list[dict], confidence: float) -> pd.DataFrame:
    frame = pd.DataFrame(rows).assign(confidence=confidence)
    return frame.reindex(columns=RESULT_COLUMNS)


def not_comparable_rows(
    model: str, reason: str, metrics: Sequence[str], *, confidence: float
) -> pd.DataFrame:
    """Evidence rows that say why a candidate's metric has no value (never a number)."""
    rows = [
        {
            "model": model,
            "slice": OVERALL[0],
            "slice_value": OVERALL[1],
            "metric": m,
            "note": reason,
        }
        for m in metrics
    ]
    return _evidence_frame(rows, confidence)


# --------------------------------------------------------------------------- choice divergence


def choice_divergence_items(
    outputs: pd.DataFrame, *, baseline: str, candidates: Sequence[str]
) -> pd.DataFrame:
    """Per candidate and choice item (lowest repeat): ``kl`` (baseline || candidate), ``js``
    (natural log, at most ln 2), ``tv`` and whether the top option changed."""
    from scipy.spatial.distance import jensenshannon
    from scipy.special import rel_entr

    def probs(model: str) -> dict[str, np.ndarray]:
        rows = outputs[outputs["model"] == model].sort_values(["item_id", "repeat"])
        rows = rows.drop_duplicates("item_id")
        return {
            r.item_id: np.asarray(r.choice_probs, dtype=float)
            for r in rows.itertuples()
            if r.choice_probs is not None and len(r.choice_probs)
        }

    base = probs(baseline)
    records = []
    for cand in candidates:
        for item, q in probs(cand).items():
            p = base.get(item)
            if p is None or p.shape != q.shape:
                continue
            p, q = np.maximum(p, 1e-12), np.maximum(q, 1e-12)
            p, q = p / p.sum(), q / q.sum()
            records.append(
                {
                    "model": cand,
                    "item_id": item,
                    "n_choices": p.size,
                    "kl": float(rel_entr(p, q).sum()),
                    "js": float(jensenshannon(p, q) ** 2),
                    "tv": float(0.5 * np.abs(p - q).sum()),
                    "top_changed": bool(p.argmax() != q.argmax()),
                }
            )
    columns = ["model", "item_id", "n_choices", "kl", "js", "tv", "top_changed"]
    return pd.DataFrame(records, columns=columns)


def choice_evidence(
    items: pd.DataFrame,
    *,
    slices: pd.DataFrame | None = None,
    slice_columns: Sequence[str] = (),
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """``choice_kl`` / ``choice_js`` rows: means over items, log-scale bootstrap-t intervals."""
    rows = []
    for model, part in items.groupby("model", sort=False):
        merged = _with_slices(part, slices, slice_columns)
        for metric, column in (("choice_kl", "kl"), ("choice_js", "js")):
            for slice_name, groups in [(OVERALL[0], None), *((c, c) for c in slice_columns)]:
                sub = merged if groups is None else merged.dropna(subset=[groups])
                if sub.empty:
                    continue
                boot = cluster_bootstrap(
                    sub[column].to_numpy(),
                    np.ones(len(sub)),
                    groups=None if groups is None else sub[groups].astype(str).to_numpy(),
                    n_resamples=n_resamples,
                    confidence=confidence,
                    seed=seed,
                    scale="log",
                )
                if groups is not None:
                    boot = boot[boot["group"] != "all"]
                for r in boot.to_dict("records"):
                    value = OVERALL[1] if groups is None else r["group"]
                    rows.append(
                        _value_row(model, metric, slice_name, value, r, 0.0, "cluster_bootstrap_t")
                    )
    return _evidence_frame(rows, confidence)


# --------------------------------------------------------------------------- shift tests


def _shift_row(model, quantity, test, statistic, p, n, effect, effect_name, paired, note=""):
    return {
        "model": model,
        "quantity": quantity,
        "test": test,
        "statistic": float(statistic) if statistic is not None else math.nan,
        "p_value": float(p) if p is not None else math.nan,
        "n": int(n),
        "effect": float(effect) if effect is not None else math.nan,
        "effect_name": effect_name,
        "paired": paired,
        "note": note,
    }


def label_shift(preds: pd.DataFrame, model: str, quantity: str) -> list[dict]:
    """Stuart–Maxwell (paired) and G-test (unpaired) on predicted labels ``base``/``cand``."""
    from scipy.stats import chi2_contingency
    from statsmodels.stats.contingency_tables import SquareTable

    labels = sorted(set(preds["base"]) | set(preds["cand"]))
    n = len(preds)
    if n == 0 or len(labels) < 2:
        return []
    table = pd.crosstab(preds["base"], preds["cand"]).reindex(
        index=labels, columns=labels, fill_value=0
    )
    marg_b = table.sum(axis=1).to_numpy(dtype=float)
    marg_c = table.sum(axis=0).to_numpy(dtype=float)
    tv = 0.5 * float(np.abs(marg_b - marg_c).sum()) / n
    out = []
    if not (table.to_numpy() - np.diag(np.diag(table.to_numpy()))).any():  # nothing changed
        return [
            _shift_row(
                model,
                quantity,
                "stuart_maxwell",
                0.0,
                1.0,
                n,
                tv,
                "total variation between label shares",
                True,
                "no prediction changed: the two label distributions are the same",
            ),
        ]
    off = table.to_numpy() - np.diag(np.diag(table.to_numpy()))
    moving = (off.sum(axis=0) + off.sum(axis=1)) > 0  # labels in some changed prediction
    square = table.to_numpy()[np.ix_(moving, moving)]
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a singular covariance: report it, do not guess
            sm = SquareTable(square, shift_zeros=False).homogeneity()
        out.append(
            _shift_row(
                model,
                quantity,
                "stuart_maxwell",
                sm.statistic,
                sm.pvalue,
                n,
                tv,
                "total variation between label shares",
                True,
                "chi-square approximation; few items per label make it rough",
            )
        )
    except (np.linalg.LinAlgError, ValueError, Warning) as exc:
        out.append(
            _shift_row(
                model,
                quantity,
                "stuart_maxwell",
                None,
                None,
                n,
                tv,
                "total variation between label shares",
                True,
                f"not computed: {exc}",
            )
        )
    both = np.vstack([marg_b, marg_c])
    both = both[:, both.sum(axis=0) > 0]
    if both.shape[1] >= 2:
        g, p, _, _ = chi2_contingency(both, lambda_="log-likelihood", correction=False)
        out.append(
            _shift_row(
                model,
                quantity,
                "g_test",
                g,
                p,
                n,
                tv,
                "total variation between label shares",
                False,
                "treats the two prediction sets as independent samples (they are paired: "
                "conservative)",
            )
        )
    return out


def sample_shift(base: np.ndarray, cand: np.ndarray, model: str, quantity: str) -> list[dict]:
    """KS and Anderson–Darling (unpaired) and Wilcoxon signed-rank (paired) on paired values."""
    from scipy.stats import anderson_ksamp, ks_2samp, wilcoxon

    keep = np.isfinite(base) & np.isfinite(cand)
    b, c = base[keep], cand[keep]
    n = int(b.size)
    if n < 2:
        return []
    median = float(np.median(c - b))
    ks = ks_2samp(c, b)
    note = "treats the two samples as independent (they are paired: conservative)"
    out = [
        _shift_row(
            model,
            quantity,
            "kolmogorov_smirnov",
            ks.statistic,
            ks.pvalue,
            n,
            median,
            "median paired difference (candidate - baseline)",
            False,
            note,
        )
    ]
    if np.unique(np.concatenate([b, c])).size > 1:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy caps the p-value to [0.001, 0.25] and warns
            ad = anderson_ksamp([c, b])
        out.append(
            _shift_row(
                model,
                quantity,
                "anderson_darling",
                ad.statistic,
                ad.pvalue,
                n,
                median,
                "median paired difference (candidate - baseline)",
                False,
                note + "; scipy's p-value is capped to [0.001, 0.25]",
            )
        )
    diff = c - b
    p = float(wilcoxon(diff, zero_method="wilcox").pvalue) if np.any(diff != 0) else 1.0
    out.append(
        _shift_row(
            model,
            quantity,
            "wilcoxon_signed_rank",
            None,
            p,
            n,
            median,
            "median paired difference (candidate - baseline)",
            True,
        )
    )
    return out


def caveat_drop(
    base_text: Sequence[str], cand_text: Sequence[str], model: str, *, confidence: float
) -> list[dict]:
    """Share of the baseline's answers with a caveat that the candidate's answer lacks."""
    has_b = np.array([bool(CAVEAT.search(t or "")) for t in base_text])
    has_c = np.array([bool(CAVEAT.search(t or "")) for t in cand_text])
    n = int(has_b.sum())
    if n == 0:
        return []
    dropped = int((has_b & ~has_c).sum())
    lo, hi = proportion_ci(dropped, n, confidence=confidence)
    return [
        _shift_row(
            model,
            "caveats",
            "clopper_pearson",
            dropped,
            None,
            n,
            dropped / n,
            "share of baseline caveats dropped",
            True,
            f"{confidence * 100:g}% CI {lo:.3f} to {hi:.3f}",
        )
    ]


def distribution_shift(
    outputs: pd.DataFrame,
    outcomes: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str],
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Every shift test per candidate (:data:`SHIFT_COLUMNS`): labels, option letters,
    confidence, output length in tokens, caveats (see the module docstring)."""
    first = outputs.sort_values(["model", "item_id", "repeat"]).drop_duplicates(
        ["model", "item_id"]
    )
    first = first.set_index(["model", "item_id"])
    pred = outcomes.sort_values(["model", "item_id", "repeat"]).drop_duplicates(
        ["model", "item_id"]
    )
    pred = pred.set_index(["model", "item_id"])
    rows = []
    for cand in candidates:
        for task, quantity in (("classification", "labels"), ("multiple_choice", "options")):
            pairs = _pair_column(pred, baseline, cand, "pred", task=task)
            rows += label_shift(pairs.dropna().astype(str), cand, quantity)
        conf = _pair_column(first, baseline, cand, _confidence_column(first)).astype(float)
        rows += sample_shift(conf["base"].to_numpy(), conf["cand"].to_numpy(), cand, "confidence")
        length = _pair_column(first, baseline, cand, "output_tokens").astype(float)
        rows += sample_shift(
            length["base"].to_numpy(), length["cand"].to_numpy(), cand, "output_tokens"
        )
        texts = _pair_column(first, baseline, cand, "output").fillna("")
        rows += caveat_drop(list(texts["base"]), list(texts["cand"]), cand, confidence=confidence)
    return pd.DataFrame(rows, columns=SHIFT_COLUMNS)


def _confidence_column(outputs: pd.DataFrame) -> str:
    if "choice_confidence" in outputs and outputs["choice_confidence"].notna().any():
        return "choice_confidence"
    return "mean_token_prob"


def _pair_column(
    frame: pd.DataFrame, baseline: str, cand: str, column: str, *, task: str | None = None
) -> pd.DataFrame:
    if column not in frame.columns:
        return pd.DataFrame(columns=["base", "cand"])
    b = frame.xs(baseline, level="model")
    c = frame.xs(cand, level="model") if cand in frame.index.get_level_values(0) else b.iloc[:0]
    if task is not None and "task" in b.columns:
        b = b[b["task"] == task]
    joined = (
        b[[column]]
        .set_axis(["base"], axis=1)
        .join(c[[column]].set_axis(["cand"], axis=1), how="inner")
    )
    if column == "pred":
        joined = joined[joined["base"].notna() & joined["cand"].notna()]
    return joined


# --------------------------------------------------------------------------- KL vs flips


def kl_flip_table(
    kl_items: pd.DataFrame,
    flips: pd.DataFrame,
    *,
    slices: pd.DataFrame,
    slice_columns: Sequence[str],
    measure: str,
) -> pd.DataFrame:
    """Per candidate and slice value: mean item KL, flip rate, and KL of flipped vs kept items.

    ``kl_items``: ``model, item_id, kl`` (an item's mean token KL, or its choice KL);
    ``flips``: :func:`kit.analysis.compare.item_flips` rows.
    """
    flipped = flips.assign(
        flipped=flips["flip"].isin(["right_to_wrong", "wrong_to_right"]).astype(float)
    )[["model", "item_id", "flipped"]]
    merged = kl_items.merge(flipped, on=["model", "item_id"], how="inner")
    merged = merged.join(slices.set_index("id")[list(slice_columns)], on="item_id")
    rows = []
    for column in [None, *slice_columns]:
        keys = ["model"] if column is None else ["model", column]
        part = merged if column is None else merged.dropna(subset=[column])
        for key, g in part.groupby(keys, sort=True):
            model = key[0] if isinstance(key, tuple) else key
            rows.append(
                {
                    "model": model,
                    "slice": OVERALL[0] if column is None else column,
                    "slice_value": OVERALL[1] if column is None else str(key[1]),
                    "measure": measure,
                    "n": len(g),
                    "mean_kl": float(g["kl"].mean()),
                    "flip_rate": float(g["flipped"].mean()),
                    "kl_flipped": float(g.loc[g["flipped"] == 1, "kl"].mean())
                    if (g["flipped"] == 1).any()
                    else math.nan,
                    "kl_kept": float(g.loc[g["flipped"] == 0, "kl"].mean())
                    if (g["flipped"] == 0).any()
                    else math.nan,
                }
            )
    columns = [
        "model",
        "slice",
        "slice_value",
        "measure",
        "n",
        "mean_kl",
        "flip_rate",
        "kl_flipped",
        "kl_kept",
    ]
    return pd.DataFrame(rows, columns=columns)


def kl_flip_relation(
    table: pd.DataFrame, kl_items: pd.DataFrame, flips: pd.DataFrame
) -> pd.DataFrame:
    """How well KL tracks flips: per slice column the Pearson and Spearman correlation of
    (mean KL, flip rate) over candidates x slice values, and per candidate the AUC of an
    item's KL for telling flipped items from kept ones (Mann–Whitney), with p-values."""
    from scipy.stats import mannwhitneyu, pearsonr, spearmanr

    rows = []
    for (slice_name, measure), part in table.groupby(["slice", "measure"], sort=True):
        part = part.dropna(subset=["mean_kl", "flip_rate"])
        if len(part) >= 3 and part["mean_kl"].nunique() > 1 and part["flip_rate"].nunique() > 1:
            r, p_r = pearsonr(part["mean_kl"], part["flip_rate"])
            rho, p_rho = spearmanr(part["mean_kl"], part["flip_rate"])
        else:
            r = p_r = rho = p_rho = math.nan
        rows.append(
            {
                "scope": f"slice:{slice_name}",
                "measure": measure,
                "n": len(part),
                "pearson_r": r,
                "pearson_p": p_r,
                "spearman_rho": rho,
                "spearman_p": p_rho,
                "auc": math.nan,
                "auc_p": math.nan,
            }
        )
    flagged = flips.assign(flipped=flips["flip"].isin(["right_to_wrong", "wrong_to_right"]))
    merged = kl_items.merge(flagged[["model", "item_id", "flipped"]], on=["model", "item_id"])
    measure = table["measure"].iloc[0] if len(table) else ""
    for model, g in merged.groupby("model", sort=True):
        yes, no = g.loc[g["flipped"], "kl"], g.loc[~g["flipped"], "kl"]
        if len(yes) and len(no):
            u = mannwhitneyu(yes, no, alternative="two-sided")
            auc, p = u.statistic / (len(yes) * len(no)), u.pvalue
        else:
            auc = p = math.nan
        rows.append(
            {
                "scope": f"items:{model}",
                "measure": measure,
                "n": len(g),
                "pearson_r": math.nan,
                "pearson_p": math.nan,
                "spearman_rho": math.nan,
                "spearman_p": math.nan,
                "auc": auc,
                "auc_p": p,
            }
        )
    columns = [
        "scope",
        "measure",
        "n",
        "pearson_r",
        "pearson_p",
        "spearman_rho",
        "spearman_p",
        "auc",
        "auc_p",
    ]
    return pd.DataFrame(rows, columns=columns)
