"""The serving:, cost: and study-level serving: blocks: validated, errors name the key."""

from __future__ import annotations

import pytest
from test_study import write_study

from kit.errors import ValidationError
from kit.study import load_study

BASE = {"name": "base", "runtime": "llamacpp", "model": "builtin:smollm2-135m-instruct"}


def bad(tmp_path, **overrides) -> str:
    with pytest.raises(ValidationError) as err:
        load_study(write_study(tmp_path, **overrides))
    return str(err.value)


def test_defaults_follow_the_runtime(tmp_path):
    study = load_study(
        write_study(tmp_path, baseline={**BASE, "serving": {}, "cost": {"usd_per_hour": 0.5}})
    )
    block = study.baseline.serving
    assert block.resolved(study.baseline) == "llamacpp_server" and block.parallel == 1
    assert block.interrupt_requests is False and study.baseline.cost.mode == "hourly"
    assert study.serving.profiles == ["synchronous", "concurrency", "rate_sweep", "prompt_length"]
    shorthand = load_study(write_study(tmp_path, baseline={**BASE, "serving": "llamacpp_server"}))
    assert shorthand.baseline.serving.deploy == "llamacpp_server"


def test_serving_and_cost_do_not_change_the_model_fingerprint(tmp_path):
    plain = load_study(write_study(tmp_path, baseline=BASE)).baseline
    served = load_study(
        write_study(
            tmp_path, baseline={**BASE, "serving": {"threads": 2}, "cost": {"usd_per_hour": 1}}
        )
    ).baseline
    assert plain.fingerprint() == served.fingerprint()


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        (
            {**BASE, "serving": {"parallel": 4}},
            "field 'baseline.serving.parallel': llama-cpp-python's server",
        ),
        (
            {**BASE, "serving": {"deploy": "transformers"}},
            "serving.deploy 'transformers' serves runtime 'transformers'",
        ),
        (
            {**BASE, "serving": {"deploy": "openai"}},
            "serving.endpoint is required for deploy: openai",
        ),
        ({**BASE, "serving": {"threads": 0}}, "field 'baseline.serving.threads'"),
        ({**BASE, "serving": {"port": 80}}, "field 'baseline.serving.port'"),
        ({**BASE, "serving": {"batch_sizes": [4, 1]}}, "field 'baseline.serving.batch_sizes'"),
        ({**BASE, "serving": {"treads": 2}}, "field 'baseline.serving.treads': unknown key"),
        ({**BASE, "serving": {"extra_args": ["--host", "0.0.0.0"]}}, "['--host'] are set by kit"),
        (
            {
                **BASE,
                "cost": {
                    "usd_per_hour": 1,
                    "usd_per_1m_input_tokens": 1,
                    "usd_per_1m_output_tokens": 2,
                },
            },
            "not both",
        ),
        (
            {**BASE, "cost": {"usd_per_1m_input_tokens": 1}},
            "both usd_per_1m_input_tokens and usd_per_1m_output_tokens",
        ),
        ({**BASE, "cost": {"usd_per_hour": -1}}, "field 'baseline.cost.usd_per_hour'"),
    ],
)
def test_bad_model_blocks_name_the_key(tmp_path, baseline, expected):
    assert expected in bad(tmp_path, baseline=baseline)


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        ({"profiles": ["synchronous", "burst"]}, "field 'serving.profiles.1'"),
        ({"concurrency": [4, 2]}, "field 'serving.concurrency'"),
        ({"reference": "concurrency4"}, "field 'serving.reference': must be synchronous"),
        ({"slo": {}}, "give at least one of ttft_ms, tpot_ms, e2e_ms"),
        ({"requests": 0}, "field 'serving.requests'"),
        ({"sweep_size": 2}, "field 'serving.sweep_size'"),
    ],
)
def test_bad_load_blocks_name_the_key(tmp_path, serving, expected):
    assert expected in bad(tmp_path, serving=serving)


def test_predictions_cannot_be_served_without_a_deploy(tmp_path):
    spec = {"name": "base", "runtime": "predictions", "model": "p.jsonl", "serving": {}}
    message = bad(tmp_path, baseline=spec)
    assert "field 'baseline': serving.deploy is required for runtime 'predictions'" in message
