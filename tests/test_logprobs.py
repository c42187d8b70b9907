"""Log-probabilities: the engine's per-request logprobs / prompt_logprobs equal a log-softmax over the logits of a
plain full forward (the independent reference), in mixed batches with chunked prefill; the HTTP API's
``logprobs`` / ``top_logprobs`` (chat) and ``logprobs`` + ``echo`` (completions) with the official client."""

from __future__ import annotations

import math

import pytest
import torch

from r1kit.engine import LLMEngine
from r1kit.generate import MAX_LOGPROBS, GenerationError, SamplingParams


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of a full forward over ids without any cache: row p predicts token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None
            outs[o.request_id].append(o)
    return outs


def test_engine_logprobs_match_log_softmax(make_model) -> None:
    model = make_model("tiny-dense")
    engine = LLMEngine(model, num_blocks=64, block_size=4, chunk_size=5, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = {"a": [3, 17, 9, 44, 5, 6, 7, 8, 21, 2, 30], "b": [5, 1, 2], "c": [9, 9, 9, 9, 9, 9, 9]}
    requests = {
        "a": (prompts["a"], SamplingParams(max_new_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2)),
        "b": (prompts["b"], SamplingParams(max_new_tokens=4, temperature=0.8, seed=1, logprobs=0)),
        "c": (prompts["c"], SamplingParams(max_new_tokens=4, temperature=0)),  # no logprobs: shares the batch
    }
    outs = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        tokens = [o.token for o in outs[rid]]
        ref = reference_logprobs(model, prompt + tokens)  # (T, V)
        if params.logprobs is None:
            assert all(o.logprobs is None for o in outs[rid])
            continue
        for i, o in enumerate(outs[rid]):
            row = ref[len(prompt) - 1 + i]
            assert o.logprobs.token == o.token
            assert o.logprobs.logprob == pytest.approx(row[o.token].item(), abs=1e-4)
            top = row.topk(params.logprobs)
            assert [t for t, _ in o.logprobs.top] == top.indices.tolist()
            assert [lp for _, lp in o.logprobs.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    first = outs["a"][0]
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(prompts["a"])
    ref = reference_logprobs(model, prompts["a"])
    for p in range(1, len(prompts["a"])):
        entry = first.prompt_logprobs[p]
        assert entry.token == prompts["a"][p]
        assert entry.logprob == pytest.approx(ref[p - 1, prompts["a"][p]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == ref[p - 1].topk(2).indices.tolist()
    assert all(o.prompt_logprobs is None for o in outs["a"][1:])


def test_prompt_logprobs_bypass_the_prefix_cache(make_model) -> None:
    """A prompt already in the prefix cache is still computed in full when its logprobs are wanted."""
    model = make_model("tiny-dense")
    engine = LLMEngine(model, num_blocks=64, block_size=4)
    prompt = list(range(3, 16))
    run(engine, {"warm": (prompt, SamplingParams(max_new_tokens=1, temperature=0))})
    outs = run(engine, {"x": (prompt, SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0))})
    ref = reference_logprobs(model, prompt)
    got = [e.logprob for e in outs["x"][0].prompt_logprobs[1:]]
    assert got == pytest.approx([ref[p - 1, prompt[p]].item() for p in range(1, len(prompt))], abs=1e-4)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True])
def test_bad_logprobs_values_name_the_field(field, value) -> None:
    with pytest.raises(GenerationError, match=f"{field} = "):
        SamplingParams(**{field: value})


def test_speculative_and_logprobs_refused() -> None:
    with pytest.raises(GenerationError, match="speculative.*log-probabilities"):
        SamplingParams(speculative=True, logprobs=1)
    assert math.isfinite(MAX_LOGPROBS)


# ---------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def nano_server():
    from r1kit.api import R1Model
    from r1kit.serve.engine_service import EngineService
    from r1kit.serve.openai_api import running_server

    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    service = EngineService(model, max_num_seqs=4)
    service.start()
    try:
        with running_server(service) as base:
            yield base, service, model
    finally:
        service.shutdown(drain=False)


def _client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)


def test_http_completion_echo_logprobs_equal_log_softmax(nano_server) -> None:
    base, service, model = nano_server
    prompt = "12+35="
    out = _client(base).completions.create(model=service.model_name, prompt=prompt, max_tokens=3, temperature=0,
                                           logprobs=2, echo=True)
    choice = out.choices[0]
    ids = model.tokenizer.encode(prompt)
    generated = out.usage.completion_tokens
    assert choice.text.startswith(prompt) and len(choice.logprobs.tokens) == len(ids) + generated
    all_ids = ids + [model.tokenizer.token_to_id(t) or model.tokenizer.encode(t)[0]
                     for t in choice.logprobs.tokens[len(ids):]]
    ref = reference_logprobs(model.model, all_ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    for p in range(1, len(all_ids)):
        assert choice.logprobs.token_logprobs[p] == pytest.approx(ref[p - 1, all_ids[p]].item(), abs=1e-4)
        top = ref[p - 1].topk(2)
        assert sorted(choice.logprobs.top_logprobs[p].values(), reverse=True) == pytest.approx(
            top.values.tolist(), abs=1e-4)
    assert choice.logprobs.text_offset[:2] == [0, len(choice.logprobs.tokens[0])]
    by_ids = _client(base).completions.create(model=service.model_name, prompt=ids, max_tokens=3, temperature=0,
                                              logprobs=2, echo=True)  # token ids, as lm-eval sends them
    assert by_ids.choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs


def test_http_chat_logprobs_streamed_and_not(nano_server) -> None:
    base, service, model = nano_server
    messages = [{"role": "user", "content": "What is 2+3?"}]
    kw = dict(model=service.model_name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    out = _client(base).chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    prompt = model.tokenizer.encode_chat(messages)
    tokens = [e.token for e in content]
    generated = [model.tokenizer.encode(t)[0] for t in tokens]
    ref = reference_logprobs(model.model, prompt + generated)
    for i, entry in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(row[generated[i]].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    stream = _client(base).chat.completions.create(**kw, stream=True)
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


@pytest.mark.parametrize("extra, param", [({"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
                                          ({"top_logprobs": 2}, "top_logprobs")])
def test_http_top_logprobs_errors_are_400(nano_server, extra, param) -> None:
    import openai

    base, service, _ = nano_server
    with pytest.raises(openai.BadRequestError) as err:
        _client(base).chat.completions.create(model=service.model_name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, **extra)
    assert param in str(err.value)


def test_python_api_complete_prompt_logprobs(nano_server) -> None:
    _, _, model = nano_server
    ids = model.tokenizer.encode("7*8=56")
    out = model.complete(input_ids=ids, max_new_tokens=2, temperature=0, logprobs=1, prompt_logprobs=1)
    ref = reference_logprobs(model.model, ids + out.token_ids)
    assert out.prompt_logprobs[0] is None
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(
        [ref[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=1e-4)
    assert [e.logprob for e in out.logprobs] == pytest.approx(
        [ref[len(ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)], abs=1e-4)
    assert out.text == model.generate(input_ids=ids, max_new_tokens=2, temperature=0)


# ---------------------------------------------------------------------------------------------------- gRPC
def test_grpc_logprobs_and_prompt_logprobs_equal_log_softmax(nano_server) -> None:
    """SamplingOptions.logprobs / prompt_logprobs over a real gRPC channel: each value a plain forward's
    log_softmax, the top alternatives its top-k; the streamed chunks carry the same entries."""
    import grpc

    from r1kit.serve.grpc_service import serve_grpc
    from r1kit.serve.proto import r1kit_pb2 as pb
    from r1kit.serve.proto import r1kit_pb2_grpc as pb_grpc

    _, service, model = nano_server
    server = serve_grpc(service, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GeneratorStub(channel)
            request = pb.GenerateRequest(text="12+35=", sampling=pb.SamplingOptions(
                max_new_tokens=3, temperature=0, logprobs=2, prompt_logprobs=2))
            reply = stub.Generate(request, timeout=300)
            chunks = list(stub.GenerateStream(request, timeout=300))
            bad = pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(logprobs=MAX_LOGPROBS + 1))
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(bad, timeout=300)
    finally:
        server.stop(grace=None)
    prompt = [e.token for e in reply.prompt_logprobs]
    generated = [e.token for e in reply.logprobs]
    assert prompt == model.tokenizer.encode("12+35=") and len(generated) == reply.usage.completion_tokens == 3
    ref = reference_logprobs(model.model, prompt + generated)
    assert reply.prompt_logprobs[0].none and not any(e.none for e in reply.prompt_logprobs[1:])
    for p, entry in enumerate(list(reply.prompt_logprobs)[1:] + list(reply.logprobs), start=1):
        assert entry.logprob == pytest.approx(ref[p - 1, entry.token].item(), abs=1e-4)
        assert [t.logprob for t in entry.top] == pytest.approx(ref[p - 1].topk(2).values.tolist(), abs=1e-4)
        assert entry.text == model.tokenizer.decode([entry.token])
    assert [e for c in chunks for e in c.logprobs] == list(reply.logprobs)
    assert [e for c in chunks for e in c.prompt_logprobs] == list(reply.prompt_logprobs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.value.details()
