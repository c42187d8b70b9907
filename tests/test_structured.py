"""Structured outputs: grammar-constrained decoding (llguidance) on the engine's batched sampler. Every constrained
output of the bundled nano model (sampled at temperature 1, so the grammar does the work) parses and validates
with ``jsonschema`` against its random schema, while an unconstrained request shares the batch; regex and choice
constraints; the constraint waits for ``</think>``; HTTP response_format and the 400s naming what is unsupported."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from r1kit.api import R1Model  # noqa: E402
from r1kit.engine import LLMEngine  # noqa: E402
from r1kit.generate import GenerationError, SamplingParams  # noqa: E402
from r1kit.structured import GuideFactory, StructuredError, apply_guides  # noqa: E402


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random object schema of bounded size: strings (maxLength), bounded integers, booleans, enums, arrays of
    enums (maxItems), nested objects."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth < 1 else [])
    properties = {}
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 6)}
        elif kind == "integer":
            prop = {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 999])}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", 7, None], rng.randint(1, 3))}
        elif kind == "array":
            prop = {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": rng.randint(1, 3)}
        else:
            prop = random_schema(rng, depth + 1)
        properties[f"f{i}_{kind}"] = prop
    return {"type": "object", "properties": properties, "required": sorted(properties),
            "additionalProperties": False}


@pytest.fixture(scope="module")
def nano() -> R1Model:
    return R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def guides(nano) -> GuideFactory:
    return GuideFactory(nano.tokenizer, nano.config.vocab_size, nano.stop_ids())


def run_engine(nano, requests):
    engine = LLMEngine(nano.model, max_num_seqs=16, num_blocks=256, stop_ids=nano.stop_ids())
    for rid, (prompt, params, guide) in requests.items():
        engine.add_request(rid, prompt, params, guide)
    tokens, reasons = {rid: [] for rid in requests}, {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            tokens[o.request_id].append(o.token)
            if o.finished:
                reasons[o.request_id] = o.finish_reason.value
    texts = {rid: nano.tokenizer.decode([t for t in ids if t not in nano.stop_ids()], skip_special_tokens=True)
             for rid, ids in tokens.items()}
    return texts, reasons


def test_random_schemas_validate_in_a_shared_batch(nano, guides) -> None:
    rng = random.Random(0)
    prompt = nano.tokenizer.encode("The answer as JSON: ")
    requests, schemas = {}, {}
    for seed in range(8):
        schemas[f"s{seed}"] = schema = random_schema(rng)
        spec = {"type": "json_schema", "schema": schema}
        requests[f"s{seed}"] = (prompt, SamplingParams(max_new_tokens=160, temperature=1.0, top_p=1.0, seed=seed,
                                                       structured=spec), guides.new(spec))
    requests["json"] = (prompt, SamplingParams(max_new_tokens=160, temperature=1.0, top_p=1.0, seed=99,
                                               structured={"type": "json_object"}),
                        guides.new({"type": "json_object"}))
    requests["free"] = (prompt, SamplingParams(max_new_tokens=20, temperature=0), None)  # same batch, no grammar
    texts, reasons = run_engine(nano, requests)
    for rid, schema in schemas.items():
        assert reasons[rid] == "stop", (rid, texts[rid])
        jsonschema.validate(json.loads(texts[rid]), schema)
    assert reasons["json"] == "stop" and isinstance(json.loads(texts["json"]), dict)
    assert texts["free"] == nano.generate(input_ids=prompt, max_new_tokens=20, temperature=0)


def test_regex_and_choice(nano, guides) -> None:
    prompt = nano.tokenizer.encode("12*12=")
    regex, choices = r"[0-9]{1,4}(\.[0-9]{1,2})?", ["yes", "no", "maybe so"]
    specs = {"regex": {"type": "regex", "pattern": regex}, "choice": {"type": "choice", "choices": choices}}
    requests = {rid: (prompt, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3, structured=spec),
                      guides.new(spec)) for rid, spec in specs.items()}
    texts, reasons = run_engine(nano, requests)
    assert re.fullmatch(regex, texts["regex"]) and texts["choice"] in choices, texts


def test_constraint_waits_for_think_close(nano, guides) -> None:
    close = nano.tokenizer.token_to_id("</think>")
    guide = guides.new({"type": "choice", "choices": ["ok"]}, think_close_id=close)
    logits = torch.zeros(1, nano.config.vocab_size)
    assert torch.equal(apply_guides(logits, [guide]), logits)  # the reasoning is free
    guide.advance(nano.tokenizer.encode("hmm")[0])
    guide.advance(close)
    allowed = torch.isfinite(apply_guides(logits, [guide]))[0]
    assert guide.active and 0 < int(allowed.sum()) < nano.config.vocab_size


@pytest.mark.parametrize("spec, match", [
    ({"type": "json_schema", "schema": {"type": "object", "not": {"required": ["a"]}}}, "not"),
    ({"type": "json_schema", "schema": {"type": "string", "pattern": "(?=a)b"}}, "look-around"),
    ({"type": "regex", "pattern": "(unclosed"}, "guided_regex"),
])
def test_unsupported_constraints_name_the_feature(guides, spec, match) -> None:
    with pytest.raises(StructuredError, match=match):
        guides.new(spec)


def test_python_api_complete_structured(nano) -> None:
    out = nano.complete("Colour: ", max_new_tokens=8, temperature=1.0, seed=0,
                        structured={"type": "choice", "choices": ["red", "green"]})
    assert out.text in ("red", "green") and out.finish_reason == "stop"
    choice = {"type": "choice", "choices": ["left", "right"]}
    reply = nano.chat([{"role": "user", "content": "Pick"}], thinking=False, structured=choice, max_new_tokens=8,
                      temperature=1.0, seed=0)
    assert reply.content in ("left", "right")
    streamed = "".join(nano.chat([{"role": "user", "content": "Pick"}], thinking=False, structured=choice,
                                 max_new_tokens=8, temperature=1.0, seed=0, stream=True))
    assert streamed.strip() in ("left", "right")


def test_bad_spec_shapes_are_generation_errors() -> None:
    for spec in [{"type": "yaml"}, {"type": "json_schema"}, {"type": "choice", "choices": []}, "json"]:
        with pytest.raises(GenerationError, match="structured"):
            SamplingParams(structured=spec)


def test_http_response_format(nano) -> None:
    import openai

    from r1kit.serve.engine_service import EngineService
    from r1kit.serve.openai_api import running_server

    schema = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    service = EngineService(nano, max_num_seqs=4)
    service.start()
    try:
        with running_server(service) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
            out = client.completions.create(model=service.model_name, prompt="JSON: ", max_tokens=40, temperature=1,
                                            seed=1, extra_body={"response_format": {
                                                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
            chat = client.chat.completions.create(model=service.model_name, max_tokens=4, messages=[
                {"role": "user", "content": "Pick"}], extra_body={"guided_choice": ["a", "b"]})
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=service.model_name, prompt="x", max_tokens=4, extra_body={
                    "response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}})
    finally:
        service.shutdown(drain=False)
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    assert chat.choices[0].finish_reason in ("stop", "length")  # nano reasons first: the choice waits for </think>
    assert err.value.body["param"] == "response_format" and "not" in err.value.body["message"]


def test_grpc_structured_options(nano) -> None:
    import grpc

    from r1kit.serve.engine_service import EngineService
    from r1kit.serve.grpc_service import serve_grpc
    from r1kit.serve.proto import r1kit_pb2 as pb
    from r1kit.serve.proto import r1kit_pb2_grpc as pb_grpc

    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}
    service = EngineService(nano, max_num_seqs=4)
    service.start()
    server = serve_grpc(service, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GeneratorStub(channel)
            sampling = pb.SamplingOptions(max_new_tokens=30, temperature=1.0, seed=2, json_schema=json.dumps(schema))
            reply = stub.Generate(pb.GenerateRequest(text="JSON: ", sampling=sampling), timeout=120)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(regex="a", choice=["b"])),
                              timeout=30)
    finally:
        server.stop(grace=None)
        service.shutdown(drain=False)
    jsonschema.validate(json.loads(reply.text), schema)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not several" in err.value.details()


def test_apply_bitmask_matches_a_token_loop() -> None:
    """The plain-torch bitmask (instead of llguidance's torch.compile'd kernel): token t is allowed iff bit t % 32
    of word t // 32 is set, checked one token at a time."""
    from r1kit.structured import apply_bitmask_

    g = torch.Generator().manual_seed(0)
    for vocab in (33, 100):
        mask = torch.randint(-2**31, 2**31 - 1, (2, (vocab + 31) // 32), dtype=torch.int32, generator=g)
        logits = torch.randn(2, vocab, generator=g)
        got = apply_bitmask_(logits.clone(), mask)
        for r in range(2):
            for t in range(vocab):
                allowed = (int(mask[r, t // 32]) >> (t % 32)) & 1
                assert got[r, t].item() == (logits[r, t].item() if allowed else float("-inf"))
