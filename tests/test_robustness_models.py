"""The robustness stage on real (tiny) models: teacher forcing through stages 1 and 2, token
KL evidence and verdicts, padding into the next length bucket, and a distilled candidate with
another tokenizer reported as not comparable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

QUESTIONS = [
    "What is the capital of France?",
    "Where is my order?",
    "Can I get a refund?",
    "Say hello.",
    "What color is the sky?",
    "Where does the sun rise?",
    "What do birds do?",
    "How many legs does a dog have?",
]
N_ITEMS = 32


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory) -> Path:
    """An untrained GPT-2 with its own BPE vocabulary: a "distilled" candidate."""
    from conftest import _SENTENCES, TINY_SPECIAL_TOKENS
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("distilled")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _SENTENCES * 3,
        vocab_size=320,
        special_tokens=list(TINY_SPECIAL_TOKENS.values()),
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **TINY_SPECIAL_TOKENS)
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_model_dir, distilled_dir):
    from kit.stages.candidates import run_candidates
    from kit.stages.drilldown import write_drilldown_tables
    from kit.stages.freeze import check_frozen, freeze_baseline
    from kit.stages.robustness import write_robustness_tables
    from kit.verdicts import judge_run

    root = tmp_path_factory.mktemp("robust-models")
    items = [
        {"id": f"g{i:02d}", "task": "generation", "input": QUESTIONS[i % 8], "reference": "Yes."}
        for i in range(N_ITEMS)
    ]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / "prompt.jinja").write_text("{{ input }}")
    rules = [
        {"rule": "mean token KL must stay below 0.5 nats"},
        {"rule": "same top token rate must stay above 50 percent"},
        {"rule": "NaN logits must stay under 20 percent"},
    ]
    (root / "budget.yaml").write_text(yaml.safe_dump({"rules": rules}))
    model = str(tiny_model_dir)
    study = {
        "name": "robust-models",
        "eval_set": {"path": "eval.jsonl", "length_buckets": [16, 64]},
        "prompt": {"template": "prompt.jinja", "chat": False},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8, "seed": 1},
        "baseline": {"name": "base", "runtime": "transformers", "model": model, "batch_size": 8},
        "candidates": [
            {"name": "bf16", "runtime": "transformers", "model": model, "recipe": "bf16"},
            {"name": "distilled", "runtime": "transformers", "model": str(distilled_dir)},
        ],
        "perturbations": {"suite": ["casing", {"kind": "padding", "params": {"max_tokens": 120}}]},
        "distributions": {"top_k": 16},
        "budget": "budget.yaml",
    }
    (root / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    out = root / "run"
    freeze_baseline(root / "study.yaml", out, progress=False)
    run_candidates(out, progress=False)
    write_drilldown_tables(out, n_resamples=200)
    tables = write_robustness_tables(out, n_resamples=400)
    verdicts, _, _ = judge_run(out)
    return out, tables, verdicts, check_frozen(out)


def test_teacher_forcing_ran_in_stages_1_and_2(judged):
    from kit.run import Run

    out, tables, _, _ = judged
    run = Run.open(out)
    assert run.distribution_models() == ["base", "bf16", "distilled"]
    base = run.distributions("base")
    assert len(base) == N_ITEMS and set(base["n_positions"]) <= set(range(1, 9))
    assert all(len(s) == 16 for row in base["support_ids"] for s in row)
    assert run.distribution_meta("bf16")["comparable"] is True
    assert run.candidate_manifest("bf16").distributions["status"] == "scored"
    assert tables.status["bf16"]["status"] == "scored"


def test_token_kl_evidence_and_its_verdicts(judged):
    _, tables, verdicts, _ = judged
    ev = tables["distribution_evidence"]
    kl = ev[
        (ev["model"] == "bf16") & (ev["metric"] == "mean_token_kl") & (ev["slice"] == "overall")
    ]
    row = kl.iloc[0]
    assert row["n"] == N_ITEMS and row["value_method"] == "cluster_bootstrap_t"
    assert 0 < row["value_ci_low"] <= row["value"] <= row["value_ci_high"] < 0.5
    stats = tables["kl_statistics"].pivot(index="statistic", columns="model", values="value")
    assert stats.loc["mean_kl", "bf16"] == pytest.approx(row["value"], rel=1e-9)
    assert stats.loc["same_top", "bf16"] > 0.5 and stats.loc["nonfinite_positions", "bf16"] == 0
    assert set(tables["kl_percentiles"]["model"]) == {"bf16"}
    v = verdicts.set_index(["candidate", "rule_id"])
    assert v.loc[("bf16", "R1"), "verdict"] == "pass"
    assert v.loc[("bf16", "R2"), "verdict"] == "pass"  # every top token kept: exact bound
    assert v.loc[("bf16", "R3"), "verdict"] == "pass"  # 0 NaN answers of 32: below 20% for sure
    assert v.loc[("bf16", "R3"), "method"] == "clopper_pearson"


def test_a_distilled_candidate_is_not_comparable_never_a_number(judged):
    _, tables, verdicts, _ = judged
    assert tables.status["distilled"]["status"] == "not comparable"
    ev = tables["distribution_evidence"]
    rows = ev[(ev["model"] == "distilled") & ev["metric"].isin(["mean_token_kl"])]
    assert len(rows) == 1 and np.isnan(rows.iloc[0]["value"])
    assert "not comparable" in rows.iloc[0]["note"]
    assert "distilled" not in set(tables["kl_statistics"]["model"])
    v = verdicts.set_index(["candidate", "rule_id"])
    assert v.loc[("distilled", "R1"), "verdict"] == "inconclusive"
    assert "not comparable" in v.loc[("distilled", "R1"), "reason"]
    # its answers are still compared item by item (not token by token)
    shift = tables["robustness_evidence"]
    assert (shift["model"] == "distilled").any()


def test_padding_lands_in_the_next_bucket_and_check_rebuilds_it(judged):
    _, tables, _, report = judged
    assert report.ok, report.render()
    items = tables["perturbation_items"]
    padded = items[items["perturbation"] == "padding"]
    assert len(padded) == N_ITEMS
    assert (padded["source_length_bucket"] == "<16").all()
    assert (padded["length_bucket"] == "16-63").all() and (padded["prompt_tokens"] >= 16).all()
    rates = tables["artifact_rates"]
    assert set(rates["items"]) == {"clean", "casing", "padding"}
    assert set(rates["metric"]) >= {"truncation_rate", "nonfinite_logit_rate"}


@pytest.mark.notebooks
def test_the_stage_notebook_runs_on_the_run_and_draws_its_charts(judged, tmp_path):
    import papermill as pm

    from kit.pipeline import NOTEBOOKS_DIR

    out, _, _, _ = judged
    executed = tmp_path / "04b.ipynb"
    pm.execute_notebook(
        str(NOTEBOOKS_DIR / "04b_robustness.ipynb"),
        str(executed),
        parameters={"run": str(out), "n_resamples": 200},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(NOTEBOOKS_DIR),
    )
    cells = json.loads(executed.read_text())["cells"]
    svgs = [o for c in cells for o in c.get("outputs", []) if "image/svg+xml" in o.get("data", {})]
    assert len(svgs) >= 3  # heat map, KL percentiles, artifacts (and KL vs flips)
