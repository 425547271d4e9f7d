"""Token-level prediction distributions: teacher forcing in the runtimes, the KL and its
top-k bounds against an independent full-vocabulary computation, NaN logits, and a
candidate with another tokenizer reported as not comparable (never a number)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kit.analysis.distributions import (
    PERCENTILES,
    kl_statistics,
    position_divergence,
    token_divergence,
)
from kit.runtimes.base import GenerationRequest, Prompt, TokenScoreRequest
from kit.study import ModelSpec, SamplingConfig

PROMPTS = ["What is the capital of France?", "Where is my order?", "Say hello."]


def _runtime(folder, name="m", **spec):
    from kit.runtimes.hf import TransformersRuntime

    return TransformersRuntime(
        ModelSpec(name=name, runtime="transformers", model=str(folder), batch_size=2, **spec)
    )


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, tiny_model_dir):
    """Another tiny GPT-2 on the same tokenizer (fewer steps, another seed): a candidate."""
    import torch
    from conftest import _train_model
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2-b")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_model(tok, steps=120, seed=1).save_pretrained(folder, safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    tok.save_pretrained(folder)
    return folder


def _sequences(rt):
    """Greedy answers of the baseline and the teacher-forcing requests built from them."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=10, seed=1)
    gens = rt.generate(
        [GenerationRequest(f"q{i}", Prompt(text=p), 1) for i, p in enumerate(PROMPTS)],
        sampling=sampling,
    )
    requests = []
    for g, p in zip(gens, PROMPTS, strict=True):
        prompt_ids = rt.encode_prompt(Prompt(text=p))
        requests.append(
            TokenScoreRequest(g.item_id, tuple(prompt_ids + g.token_ids), len(prompt_ids))
        )
    return gens, requests


def test_teacher_forcing_reproduces_the_generation_logprobs(tiny_model_dir):
    with _runtime(tiny_model_dir) as rt:
        gens, requests = _sequences(rt)
        scores = rt.score_tokens(requests)
    for g, s in zip(gens, scores, strict=True):
        assert g.nonfinite_logits == 0 and len(g.token_ids) == g.output_tokens
        np.testing.assert_allclose(s.target_logprobs, g.token_logprobs, atol=2e-4)
        assert s.argmax_ids == g.token_ids  # greedy: the generated token is the top token
        assert all(len(ids) == 32 for ids in s.support_ids)


def _full_logprobs(folder, ids: tuple[int, ...], start: int) -> np.ndarray:
    """Independent: the model's full next-token log-softmax at every scored position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[start - 1 : -1].numpy()


@pytest.mark.parametrize("top_k", [500, 8])
def test_kl_agrees_with_an_independent_full_vocabulary_computation(
    tiny_model_dir, second_model_dir, top_k
):
    from scipy.stats import entropy

    with _runtime(tiny_model_dir, "base") as rt:
        _, requests = _sequences(rt)
        requests = [
            TokenScoreRequest(r.item_id, r.token_ids, r.start, None, top_k) for r in requests
        ]
        base = rt.score_tokens(requests)
    support = [
        TokenScoreRequest(r.item_id, r.token_ids, r.start, tuple(map(tuple, b.support_ids)))
        for r, b in zip(requests, base, strict=True)
    ]
    with _runtime(second_model_dir, "cand") as rt:
        cand = rt.score_tokens(support)
    exact, ours, upper, same, dp = [], [], [], [], []
    for r, b, c in zip(requests, base, cand, strict=True):
        p = _full_logprobs(tiny_model_dir, r.token_ids, r.start)
        q = _full_logprobs(second_model_dir, r.token_ids, r.start)
        exact += [entropy(np.exp(pi), np.exp(qi)) for pi, qi in zip(p, q, strict=True)]
        values = position_divergence(b.__dict__, c.__dict__)
        ours += list(values["kl"])
        upper += list(values["kl_upper"])
        same += list(p.argmax(axis=1) == q.argmax(axis=1))
        targets = np.asarray(r.token_ids[r.start :])
        rows = np.arange(len(targets))
        dp += list(np.exp(q[rows, targets]) - np.exp(p[rows, targets]))
        np.testing.assert_allclose(values["same_top"], p.argmax(1) == q.argmax(1))
        np.testing.assert_allclose(values["delta_p"], dp[-len(targets) :], atol=1e-6)
    exact, ours, upper = map(np.asarray, (exact, ours, upper))
    if top_k == 500:  # the whole vocabulary kept: the KL is exact
        np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(upper, exact, rtol=1e-4, atol=1e-8)
    else:  # 8 tokens and the tail: a lower and an upper bound around the exact KL
        assert np.all(ours <= exact + 1e-7) and np.all(exact <= upper + 1e-7)
        assert ours.mean() > 0.5 * exact.mean()  # the coarse-grained KL keeps most of it
    positions = pd.DataFrame(
        {
            "model": "cand",
            "item_id": "x",
            "kl": ours,
            "kl_upper": upper,
            "p_tail": 0.0,
            "same_top": np.asarray(same, float),
            "delta_p": dp,
        }
    )
    stats = kl_statistics(positions).set_index("statistic")["value"]
    assert stats["mean_kl"] == pytest.approx(ours.mean())
    assert stats["sd_kl"] == pytest.approx(ours.std(ddof=1))
    assert stats["se_kl"] == pytest.approx(ours.std(ddof=1) / math.sqrt(ours.size))
    for q_ in PERCENTILES:
        assert stats[f"kl_p{q_ * 100:g}"] == pytest.approx(np.quantile(ours, q_))
    assert stats["same_top"] == pytest.approx(np.mean(same))
    assert stats["rms_delta_p"] == pytest.approx(np.sqrt(np.mean(np.square(dp))))


def test_nan_logits_are_counted_in_generation_and_teacher_forcing(tiny_model_dir):
    with _runtime(tiny_model_dir) as rt:
        _, requests = _sequences(rt)

        def poison(module, args, output):
            output.logits[..., 7] = float("nan")  # one vocabulary entry is NaN everywhere
            return output

        handle = rt.model.register_forward_hook(poison)
        try:
            g = rt.generate(
                [GenerationRequest("q", Prompt(text=PROMPTS[0]), 1)],
                sampling=SamplingConfig(max_new_tokens=3),
            )[0]
            s = rt.score_tokens(requests[:1])[0]
        finally:
            handle.remove()
    assert g.nonfinite_logits == g.output_tokens > 0
    assert all(n == 1 for n in s.nonfinite) and all(math.isnan(v) for v in s.target_logprobs)
    from kit.scoring.artifacts import artifact_flags

    assert (
        artifact_flags({"output": g.text, "nonfinite_logits": g.nonfinite_logits})[
            "nonfinite_logits"
        ]
        == 1.0
    )


def test_positions_with_nonfinite_logits_are_excluded_and_counted():
    base = {
        "item_id": "a",
        "support_ids": [[0, 1], [0, 1]],
        "support_logprobs": [[-0.1, -2.5], [np.nan, np.nan]],
        "nonfinite": [0, 3],
        "target_logprobs": [-0.1, np.nan],
        "argmax_ids": [0, -1],
    }
    cand = {
        **base,
        "support_logprobs": [[-0.2, -1.8], [-0.1, -2.0]],
        "nonfinite": [0, 0],
        "target_logprobs": [-0.2, -0.1],
        "argmax_ids": [0, 0],
        "min_logprobs": [-9, -9],
    }
    values = position_divergence(base, cand)
    assert np.isfinite(values["kl"][0]) and np.isnan(values["kl"][1])
    rows = {
        "base": pd.DataFrame([{**base, "error": None, "min_logprobs": [-9, -9]}]),
        "cand": pd.DataFrame([{**cand, "error": None}]),
    }
    positions = token_divergence(rows, baseline="base")
    stats = kl_statistics(positions).set_index("statistic")["value"]
    assert stats["positions"] == 1 and stats["nonfinite_positions"] == 1


def test_a_candidate_with_another_tokenizer_is_not_comparable(tmp_path, tiny_model_dir):
    """A distilled model with its own vocabulary: no token-level number, and the reason."""
    from conftest import _SENTENCES, TINY_SPECIAL_TOKENS
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from kit.teacher_forcing import candidate_distributions, distribution_store, score_into

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _SENTENCES * 3,
        vocab_size=300,
        special_tokens=list(TINY_SPECIAL_TOKENS.values()),
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **TINY_SPECIAL_TOKENS)
    other = tmp_path / "other"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2)
    ).save_pretrained(other)
    tok.save_pretrained(other)
    run_dir = tmp_path / "run"
    with _runtime(tiny_model_dir, "base") as rt:
        _, requests = _sequences(rt)
        score_into(
            rt,
            requests,
            distribution_store(run_dir, "base"),
            model="base",
            progress=False,
            meta={"vocabulary_sha256": rt.vocabulary_sha256(), "top_k": 32},
        )
    with _runtime(other, "distilled") as rt:
        done = candidate_distributions(
            rt, run_dir=run_dir, baseline="base", model="distilled", progress=False
        )
    assert done["status"] == "not comparable" and "vocabulary" in done["reason"]
    store = distribution_store(run_dir, "distilled")
    assert store.is_complete() and not store.parts()


# --------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_smollm2_fp32_and_gguf_share_a_vocabulary_and_the_kl_is_real(smollm2_dir):
    """The builtin fp32 folder (transformers) and the shipped Q4_1 GGUF (llama.cpp): one
    vocabulary, so the GGUF's token KL against the fp32 answers is a number; teacher forcing
    on generation's path reproduces the GGUF's own generation logprobs, and the default
    (batched, llama-perplexity's kernels) gives the same KL up to rounding."""
    from kit.runtimes.hf import TransformersRuntime
    from kit.runtimes.llamacpp import LlamaCppRuntime

    spec = {"model": "builtin:smollm2-135m-instruct"}
    prompt = Prompt(messages=({"role": "user", "content": "Where is my order ORD-1?"},))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12, seed=1)
    with TransformersRuntime(ModelSpec(name="fp32", runtime="transformers", **spec)) as hf:
        vocab = hf.vocabulary_sha256()
        g = hf.generate([GenerationRequest("q", prompt, 1)], sampling=sampling)[0]
        ids = hf.encode_prompt(prompt)
        req = TokenScoreRequest("q", tuple(ids + g.token_ids), len(ids), None, 32)
        base = hf.score_tokens([req])[0]
    np.testing.assert_allclose(base.target_logprobs, g.token_logprobs, atol=1e-3)
    options = {"teacher_forcing": "decode"}  # generation's path: its logprobs exactly
    with LlamaCppRuntime(ModelSpec(name="q4", runtime="llamacpp", options=options, **spec)) as ll:
        assert ll.vocabulary_sha256() == vocab and ll.encode_prompt(prompt) == ids
        own = ll.generate([GenerationRequest("q", prompt, 1)], sampling=sampling)[0]
        own_ids = ids + own.token_ids
        forced = ll.score_tokens([TokenScoreRequest("q", tuple(own_ids), len(ids))])[0]
        support = tuple(map(tuple, base.support_ids))
        cand = ll.score_tokens([TokenScoreRequest("q", req.token_ids, req.start, support)])[0]
    q4 = ModelSpec(name="q4b", runtime="llamacpp", **spec)  # the default: llama-perplexity's path
    with LlamaCppRuntime(q4) as lb:
        batched = lb.score_tokens([TokenScoreRequest("q", req.token_ids, req.start, support)])[0]
    np.testing.assert_allclose(forced.target_logprobs, own.token_logprobs, atol=1e-6)
    values = position_divergence(base.__dict__, cand.__dict__)
    assert np.all(np.isfinite(values["kl"])) and 0 < values["kl"].mean() < 1.0
    assert np.all(values["kl"] <= values["kl_upper"] + 1e-12)
    # batch and single-token kernels differ in rounding only (a near-tie's top token may
    # swap): the KL over the answer agrees (measured: 0.00238 decode, 0.00235 batch)
    other = position_divergence(base.__dict__, batched.__dict__)
    assert np.all(np.isfinite(other["kl"]))
    assert other["kl"].mean() == pytest.approx(values["kl"].mean(), rel=0.2)
