"""TransformersRuntime on the tiny GPT-2 (fast) and on the real SmolLM2 (slow)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from kit.errors import CompkitError
from kit.models import ensure_builtin, weights_identity
from kit.runtimes import open_runtime
from kit.runtimes.base import ChoiceRequest, GenerationRequest, Prompt
from kit.runtimes.hf import TransformersRuntime
from kit.study import ModelSpec, SamplingConfig

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Say hello.",
    "Where is my order? I ordered it a long time ago and it still has not arrived here.",
    "What color is the sky?",
    "Can I get a refund?",
]
TEXT_PROMPTS = ["The cat sat", "A small dog ran across the green park", "Birds"]


def _spec(model: str | Path, **kw) -> ModelSpec:
    return ModelSpec(name="tiny", runtime="transformers", model=str(model), **kw)


def _chat(text: str) -> Prompt:
    return Prompt(messages=({"role": "user", "content": text},))


def _requests(seed: int = 7) -> list[GenerationRequest]:
    prompts = [_chat(q) for q in CHAT_QUESTIONS] + [Prompt(text=t) for t in TEXT_PROMPTS]
    return [GenerationRequest(f"item-{i}", p, seed=seed + i) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TransformersRuntime:
    runtime = TransformersRuntime(_spec(tiny_model_dir, batch_size=4))
    yield runtime
    runtime.close()


def _with_batch_size(rt: TransformersRuntime, batch_size: int) -> TransformersRuntime:
    spec = rt.spec.model_copy(update={"batch_size": batch_size})
    return TransformersRuntime.from_model(rt.model, rt.tokenizer, spec)


# ---------------------------------------------------------------------- generate


def test_batched_results_in_request_order_and_equal_unbatched(tiny):
    requests = _requests()
    batched = tiny.generate(requests, sampling=GREEDY)
    alone = _with_batch_size(tiny, 1).generate(requests, sampling=GREEDY)
    assert [g.item_id for g in batched] == [r.item_id for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert (b.text, b.output_tokens, b.finish_reason) == (
            a.text,
            a.output_tokens,
            a.finish_reason,
        )
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-4)
        assert a.batch_size == 1
    assert sorted(g.batch_size for g in batched) == [4] * 8


def test_left_padding_does_not_change_greedy_output(tiny):
    short = GenerationRequest("short", _chat("Say hello."), seed=1)
    long = GenerationRequest("long", _chat(CHAT_QUESTIONS[2] + " " + CHAT_QUESTIONS[2]), seed=1)
    padded = tiny.generate([short, long], sampling=GREEDY)
    alone = tiny.generate([short], sampling=GREEDY)
    assert padded[0].prompt_tokens == alone[0].prompt_tokens < padded[1].prompt_tokens
    assert padded[0].text == alone[0].text == "Hello!"
    assert padded[0].output_tokens == alone[0].output_tokens


def test_greedy_answers_follow_training_and_stop_at_eos(tiny):
    [gen] = tiny.generate(
        [GenerationRequest("q", _chat("What is the capital of France?"), 1)], sampling=GREEDY
    )
    assert gen.text == "Paris."
    assert gen.finish_reason == "stop"
    eos = tiny.tokenizer.eos_token_id
    expected = [*tiny.tokenizer("Paris.", add_special_tokens=False).input_ids, eos]
    assert gen.output_tokens == len(expected)  # the EOS token counts


def test_length_finish_reason(tiny):
    [gen] = tiny.generate(
        [GenerationRequest("t", Prompt(text="The river runs"), 1)],
        sampling=SamplingConfig(max_new_tokens=3),
    )
    assert gen.finish_reason == "length"
    assert gen.output_tokens == 3 == len(gen.token_logprobs)


def test_seeded_sampling_is_reproducible_and_depends_on_seed(tiny):
    hot = SamplingConfig(temperature=5.0, top_p=1.0, max_new_tokens=10)
    first = tiny.generate(_requests(seed=1), sampling=hot)
    again = tiny.generate(_requests(seed=1), sampling=hot)
    other = tiny.generate(_requests(seed=2), sampling=hot)
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.token_logprobs for g in first] == [g.token_logprobs for g in again]
    assert [g.text for g in first] != [g.text for g in other]


def test_top_p_sampling_logprobs_are_of_the_warped_distribution(tiny):
    nucleus = SamplingConfig(temperature=0.7, top_p=0.5, max_new_tokens=8)
    for gen in tiny.generate(_requests(), sampling=nucleus):
        assert all(-50 < lp <= 0 for lp in gen.token_logprobs)


def test_logprobs_timing_and_counts_are_consistent(tiny):
    for gen in tiny.generate(_requests(), sampling=GREEDY):
        assert len(gen.token_logprobs) == gen.output_tokens > 0
        assert all(lp <= 0 for lp in gen.token_logprobs)
        assert 0 < gen.ttft_s <= gen.latency_s
        assert gen.finish_reason in {"stop", "length"}
        assert gen.error is None


def test_greedy_logprobs_match_a_manual_forward_pass(tiny):
    request = GenerationRequest("q", _chat("What color is the sky?"), 1)
    [gen] = tiny.generate([request], sampling=GREEDY)
    prompt_ids = tiny.encode_prompt(request.prompt)
    output_ids = tiny.tokenizer(gen.text, add_special_tokens=False).input_ids
    output_ids.append(tiny.tokenizer.eos_token_id)
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
    start = len(prompt_ids) - 1
    manual = [logprobs[start + i, t].item() for i, t in enumerate(output_ids)]
    assert gen.token_logprobs == pytest.approx(manual, abs=1e-4)


def test_stop_strings_cut_text_and_finish_as_stop(tiny):
    free = tiny.generate(_requests(), sampling=GREEDY)
    stopped = tiny.generate(_requests(), sampling=GREEDY.model_copy(update={"stop": [" the"]}))
    hit = 0
    for f, s in zip(free, stopped, strict=True):
        assert " the" not in s.text
        assert f.text.startswith(s.text)
        if " the" in f.text:
            hit += 1
            assert s.text == f.text[: f.text.index(" the")]
            assert s.finish_reason == "stop"
            assert s.output_tokens < f.output_tokens
            assert len(s.token_logprobs) == s.output_tokens
            assert s.token_logprobs == pytest.approx(f.token_logprobs[: s.output_tokens], abs=1e-4)
    assert hit >= 2  # the corpus makes " the" common: the test exercised stopping


def test_progress_is_called_per_batch(tiny):
    calls: list[int] = []
    tiny.generate(_requests(), sampling=SamplingConfig(max_new_tokens=2), progress=calls.append)
    assert calls == [4, 4]


def test_out_of_memory_batch_is_retried_in_halves(tiny, monkeypatch):
    rt = _with_batch_size(tiny, 4)
    real_generate = rt.model.generate

    def generate(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("fake OOM")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(rt.model, "generate", generate)
    requests = _requests()[:4]
    split = rt.generate(requests, sampling=GREEDY)
    monkeypatch.undo()
    expected = rt.generate(requests, sampling=GREEDY)
    assert [g.text for g in split] == [g.text for g in expected]
    assert {g.batch_size for g in split} == {1}


# ---------------------------------------------------------------------- prompts


def test_chat_and_text_prompts_are_encoded_differently(tiny):
    chat, text = _chat("Say hello."), Prompt(text="Say hello.")
    templated = tiny.prompt_text(chat)
    assert templated == "<|user|>\nSay hello.<|end|>\n<|assistant|>\n"
    assert tiny.prompt_text(text) == "Say hello."
    assert tiny.count_tokens(chat) == len(
        tiny.tokenizer(templated, add_special_tokens=False).input_ids
    )
    assert tiny.count_tokens(text) == len(tiny.tokenizer("Say hello.").input_ids)
    assert tiny.count_tokens(chat) > tiny.count_tokens(text)
    gens = tiny.generate(
        [GenerationRequest("c", chat, 1), GenerationRequest("t", text, 1)], sampling=GREEDY
    )
    assert gens[0].text == "Hello!"
    assert gens[0].prompt_tokens == tiny.count_tokens(chat)
    assert gens[1].prompt_tokens == tiny.count_tokens(text)


def test_chat_prompt_without_template_is_a_clear_error(tiny):
    rt = _with_batch_size(tiny, 1)
    rt.tokenizer = type(tiny.tokenizer).from_pretrained(tiny.spec.model)
    rt.tokenizer.chat_template = None
    with pytest.raises(CompkitError, match="no chat template"):
        rt.count_tokens(_chat("hi"))


# ---------------------------------------------------------------------- score choices


def _manual_choice_logprob(
    rt: TransformersRuntime, prompt: Prompt, continuation: str
) -> tuple[float, int]:
    """Unbatched, unpadded lm-evaluation-harness loglikelihood of one continuation."""
    chat = prompt.messages is not None
    context = rt.prompt_text(prompt)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = rt.tokenizer(context + continuation, add_special_tokens=not chat).input_ids
    n_context = len(rt.tokenizer(context, add_special_tokens=not chat).input_ids)
    target = whole[n_context:]
    with torch.no_grad():
        logits = rt.model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    total = sum(logprobs[n_context - 1 + i, t].item() for i, t in enumerate(target))
    return total, len(target)


def test_score_choices_matches_manual_loglikelihood(tiny):
    requests = [
        ChoiceRequest(
            "chat", _chat("What is the capital of France?"), ("Paris.", "London.", "Rome")
        ),
        ChoiceRequest("text", Prompt(text="The sun rises in the"), (" east", " west and sets")),
        ChoiceRequest("space", Prompt(text="Water boils at one hundred "), ("degrees", "")),
        ChoiceRequest("long", _chat(CHAT_QUESTIONS[2]), ("Your order is on the way.", "No.")),
    ]
    rt = _with_batch_size(tiny, 1)  # 4 sequences per forward pass: mixes lengths and requests
    calls: list[int] = []
    scores = rt.score_choices(requests, progress=calls.append)
    assert [s.item_id for s in scores] == [r.item_id for r in requests]
    assert sum(calls) == len(requests)
    for req, got in zip(requests, scores, strict=True):
        for cont, lp, n in zip(req.continuations, got.logprobs, got.n_tokens, strict=True):
            want, want_n = _manual_choice_logprob(tiny, req.prompt, cont)
            assert n == want_n
            assert lp == pytest.approx(want, abs=1e-4)
        assert got.latency_s is not None and got.latency_s >= 0
    assert scores[0].logprobs[0] > max(scores[0].logprobs[1:])  # the trained answer wins
    assert scores[1].logprobs[0] > scores[1].logprobs[1]


def test_score_choices_is_batch_size_independent(tiny):
    requests = [
        ChoiceRequest(f"r{i}", _chat(q), ("Yes.", "Paris.", "Hello!"))
        for i, q in enumerate(CHAT_QUESTIONS)
    ]
    one = _with_batch_size(tiny, 1).score_choices(requests)
    many = _with_batch_size(tiny, 8).score_choices(requests)
    for a, b in zip(one, many, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.n_tokens == b.n_tokens


# ---------------------------------------------------------------------- identity and loading


def test_identity_describes_the_files(tiny, tiny_model_dir):
    ident = tiny.identity()
    assert ident.runtime == "transformers"
    assert ident.runtime_version.startswith("transformers ")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(ident.files)
    assert ident.weights_sha256 == weights_identity(tiny_model_dir)[0]
    assert ident.parameters == sum(p.numel() for p in tiny.model.parameters())
    assert ident.size_bytes > 0 and ident.dtype == "float32" and ident.device == "cpu"


def test_weights_fingerprint_equals_identity_without_loading(tiny, tiny_model_dir, monkeypatch):
    import kit.runtimes.hf as hf

    def no_loading(*args, **kwargs):
        raise AssertionError("weights_fingerprint must not load the model")

    monkeypatch.setattr(hf, "_load", no_loading)
    spec = _spec(tiny_model_dir.name)
    fingerprint = TransformersRuntime.weights_fingerprint(spec, base_dir=tiny_model_dir.parent)
    assert fingerprint == tiny.identity().weights_sha256
    with pytest.raises(CompkitError, match="nowhere"):
        TransformersRuntime.weights_fingerprint(_spec("nowhere"), base_dir=tiny_model_dir.parent)


def test_identity_hash_changes_when_a_weight_file_changes(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    with TransformersRuntime(_spec(copy)) as rt:
        before = rt.identity()
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with TransformersRuntime(_spec(copy)) as rt:
        after = rt.identity()
    assert before.weights_sha256 != after.weights_sha256
    assert before.files["model.safetensors"] != after.files["model.safetensors"]
    assert before.files["config.json"] == after.files["config.json"]


def test_in_memory_model_identity_hashes_the_state_dict(tiny):
    import copy

    model = copy.deepcopy(tiny.model)
    rt = TransformersRuntime.from_model(model, tiny.tokenizer, tiny.spec)
    before = rt.identity()
    assert (
        before.files == {} and before.weights_sha256 and before.extra["source"] == "in-memory model"
    )
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    after = TransformersRuntime.from_model(model, tiny.tokenizer, tiny.spec).identity()
    assert before.weights_sha256 != after.weights_sha256


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(
        CompkitError, match=r"pickle.*pytorch_model\.bin|pytorch_model\.bin.*pickle"
    ):
        TransformersRuntime(_spec(folder))
    with pytest.raises(CompkitError, match="pickle"):
        weights_identity(folder)


def test_missing_model_path_names_the_path(tmp_path):
    with pytest.raises(CompkitError) as info:
        TransformersRuntime(_spec("models/nowhere"), base_dir=tmp_path)
    message = str(info.value)
    assert "models/nowhere" in message
    assert str(tmp_path / "models" / "nowhere") in message
    assert "builtin:smollm2-135m-instruct" in message


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(CompkitError, match="smollm2-135m-instruct"):
        TransformersRuntime(_spec("builtin:nope"))


def test_registry_opens_the_runtime_with_relative_path(tiny_model_dir):
    spec = _spec(tiny_model_dir.name)
    with open_runtime(spec, base_dir=tiny_model_dir.parent) as rt:
        assert isinstance(rt, TransformersRuntime)
        assert rt.identity().extra["path"] == str(tiny_model_dir.resolve())


# ---------------------------------------------------------------------- SmolLM2 (real model)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    spec = ModelSpec(
        name="smollm2", runtime="transformers", model="builtin:smollm2-135m-instruct", batch_size=4
    )
    runtime = TransformersRuntime(spec)
    yield runtime
    runtime.close()


@pytest.mark.slow
def test_smollm2_answers_short_chat_prompts(smollm2):
    questions = [
        "What is the capital of France? Answer with one word.",
        "Say hello in one short sentence.",
        "What is 2 + 2? Answer with a number.",
        "Name a colour of the sky.",
    ]
    requests = [GenerationRequest(f"q{i}", _chat(q), seed=1) for i, q in enumerate(questions)]
    gens = smollm2.generate(requests, sampling=SamplingConfig(max_new_tokens=24))
    assert all(g.text.strip() for g in gens)
    assert "Paris" in gens[0].text
    assert gens[0].finish_reason == "stop"
    assert all(len(g.token_logprobs) == g.output_tokens for g in gens)


@pytest.mark.slow
def test_smollm2_scores_the_right_choice_higher(smollm2):
    request = ChoiceRequest(
        "mc", _chat("What is the capital of France? Answer with one word."), ("Paris", "London")
    )
    [scores] = smollm2.score_choices([request])
    assert scores.logprobs[0] > scores.logprobs[1]


@pytest.mark.slow
def test_smollm2_identity_records_the_source_gguf(smollm2, smollm2_dir):
    ident = smollm2.identity()
    assert ident.extra["builtin"] == "smollm2-135m-instruct"
    assert len(ident.extra["source_gguf_sha256"]) == 64
    assert ident.parameters > 100_000_000
    assert "chat_template.jinja" in ident.files or "tokenizer_config.json" in ident.files


@pytest.mark.slow
def test_builtin_conversion_is_reused(smollm2_dir, capsys):
    weights = smollm2_dir / "model.safetensors"
    before = os.stat(weights).st_mtime_ns
    assert ensure_builtin("smollm2-135m-instruct") == smollm2_dir
    assert os.stat(weights).st_mtime_ns == before
    assert "converting" not in capsys.readouterr().err


# ---------------------------------------------------------------------- builtin cache bookkeeping


def _fake_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A fake GGUF and a converted folder whose record matches it."""
    from kit.models import SOURCE_FILE, _sha256, _write_json

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(200)))
    target = tmp_path / "cache" / "m-fp32"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    stat = gguf.stat()
    _write_json(
        target / SOURCE_FILE,
        {
            "gguf_sha256": _sha256(gguf),
            "gguf_size": stat.st_size,
            "gguf_mtime_ns": stat.st_mtime_ns,
        },
    )
    return gguf, target


def test_builtin_cache_is_reused_while_the_gguf_bytes_are_the_same(tmp_path):
    from kit.models import _cache_is_current, read_source_record

    gguf, target = _fake_cache(tmp_path)
    assert _cache_is_current(target, gguf)
    os.utime(gguf, ns=(1, 1))  # reinstalled: same bytes, new mtime
    assert _cache_is_current(target, gguf)
    assert read_source_record(target)["gguf_mtime_ns"] == 1
    gguf.write_bytes(b"GGUF" + bytes(reversed(range(200))))  # same size, other bytes
    assert not _cache_is_current(target, gguf)
    (target / "compkit_source.json").unlink()
    assert not _cache_is_current(target, gguf)


def test_cache_root_follows_compkit_cache(tmp_path, monkeypatch):
    from kit.models import builtin_cache_dir

    monkeypatch.setenv("COMPKIT_CACHE", str(tmp_path))
    assert (
        builtin_cache_dir("smollm2-135m-instruct")
        == tmp_path / "models" / "smollm2-135m-instruct-fp32"
    )


def test_weights_identity_with_a_named_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"a")
    (tmp_path / "b.gguf").write_bytes(b"b")
    (tmp_path / "config.json").write_text("{}")
    combined, files, size = weights_identity(tmp_path, gguf_file="a.gguf")
    assert set(files) == {"a.gguf", "config.json"} and size == 3
    assert combined != weights_identity(tmp_path, gguf_file="b.gguf")[0]
    with pytest.raises(CompkitError, match=r"no GGUF file 'c\.gguf'.*a\.gguf"):
        weights_identity(tmp_path, gguf_file="c.gguf")


# ---------------------------------------------------------------------- prompt cache

_HEAD = "The cat sat on the mat. A small dog ran across the green park. Birds sing. " * 4


def _cache_calls(rt: TransformersRuntime, order: list[int]) -> dict[int, tuple]:
    from kit.runtimes.base import TokenScoreRequest

    tails = ["The cat", "A small dog ran", "Birds", "Where is my order?"]
    reqs = [GenerationRequest(f"c{i}", Prompt(text=_HEAD + tails[i]), seed=1) for i in order]
    gens = rt.generate(reqs, sampling=GREEDY)
    choices = rt.score_choices([ChoiceRequest(r.item_id, r.prompt, [" sat", " ran"]) for r in reqs])
    out = {}
    for i, req, gen, choice in zip(order, reqs, gens, choices, strict=True):
        ids = rt.encode_prompt(req.prompt)
        forced = rt.score_tokens([TokenScoreRequest(req.item_id, ids + gen.token_ids, len(ids))])
        out[i] = (gen.text, gen.token_logprobs, choice.logprobs, forced[0].target_logprobs)
    return out


def test_the_prompt_cache_serves_a_shared_head_without_changing_answers(tiny):
    """Prompts sharing a long head: generation, choice scores and teacher forcing reuse its
    whole blocks (kit.runtimes.hf_prefix), give the same answers as a runtime without the
    cache (logprobs equal to float rounding) and do not depend on the items' order."""
    rt = _with_batch_size(tiny, 4)
    warm = _cache_calls(rt, [0, 1, 2, 3])
    assert rt.reused_tokens > 0
    again = _cache_calls(rt, [3, 1, 0, 2])  # other batch rows and history: same head blocks
    spec = tiny.spec.model_copy(update={"batch_size": 4, "options": {"prompt_cache": False}})
    cold_rt = TransformersRuntime.from_model(tiny.model, tiny.tokenizer, spec)
    cold = _cache_calls(cold_rt, [0, 1, 2, 3])
    assert cold_rt.reused_tokens == 0
    for i in range(4):
        assert warm[i][0] == again[i][0] == cold[i][0], i
        assert warm[i][1] == pytest.approx(cold[i][1], abs=1e-4)
        assert warm[i][2] == again[i][2]  # one request at a time: bit-identical
        assert warm[i][2] == pytest.approx(cold[i][2], abs=1e-4)
        assert list(warm[i][3]) == list(again[i][3])
        assert list(warm[i][3]) == pytest.approx(list(cold[i][3]), abs=1e-4)


def test_a_sliding_window_model_runs_every_prompt_whole(tiny):
    """A sliding-window cache keeps no plain per-position history: the prompt cache steps
    aside (nothing reused) and the answers equal a runtime without it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=tiny.model.config.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=512,
    )
    model = MistralForCausalLM(config).eval()
    spec = tiny.spec.model_copy(update={"batch_size": 4})
    rt = TransformersRuntime.from_model(model, tiny.tokenizer, spec)
    off = TransformersRuntime.from_model(
        model, tiny.tokenizer, spec.model_copy(update={"options": {"prompt_cache": False}})
    )
    warm, cold = _cache_calls(rt, [0, 1, 2, 3]), _cache_calls(off, [0, 1, 2, 3])
    assert rt.reused_tokens == 0
    for i in range(4):
        assert warm[i][0] == cold[i][0]
        assert warm[i][2] == pytest.approx(cold[i][2], abs=1e-5)
