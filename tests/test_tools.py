"""Tool calling: schema and tool_choice checks, the DeepSeek / Hermes / Llama-3 call formats parsed from text and
from token ids (special markers kept), the HTTP API (tools rendered by the checkpoint's template as transformers
renders them, 400s naming the field, malformed calls as text, finish_reason tool_calls), R1Model.chat(tools=)
and the agent loop."""

from __future__ import annotations

import json
import types

import pytest

from r1kit import agent
from r1kit.tools import (
    CALCULATOR,
    ToolCall,
    ToolCallParser,
    ToolError,
    calculator,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOLS = [WEATHER, CALCULATOR]


# ---------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("tools, param", [
    ([], "tools"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}],
     "tools[0].function.parameters"),
])
def test_bad_tools_name_the_field(tools, param) -> None:
    with pytest.raises(ToolError) as err:
        check_tools(tools)
    assert err.value.param == param and param.split(".")[0] in str(err.value)


def test_tool_choice() -> None:
    assert check_tool_choice(None, TOOLS) == "auto" and check_tool_choice(None, []) == "none"
    assert check_tool_choice("required", TOOLS) == "required"
    assert check_tool_choice({"type": "function", "function": {"name": "calculator"}}, TOOLS) == "calculator"
    with pytest.raises(ToolError, match="'nope', which is not among the tools") as err:
        check_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    assert err.value.param == "tool_choice.function.name"
    with pytest.raises(ToolError, match="needs tools"):
        check_tool_choice("required", [])


# ---------------------------------------------------------------------------------------------------- formats
DS_CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
           "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>calculator\n"
           "```json\n{\"expression\": \"2*3\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")


@pytest.mark.parametrize("fmt, text, expected, content", [
    ("deepseek", "Let me check." + DS_CALL,
     [("get_weather", {"city": "Paris"}), ("calculator", {"expression": "2*3"})], "Let me check."),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator<｜tool▁sep｜>{\"expression\": \"1+1\"}"
                 "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", [("calculator", {"expression": "1+1"})], ""),
    ("hermes", "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
     [("get_weather", {"city": "Oslo"})], "Sure."),
    ("hermes", "<tool_call>{\"name\": \"calculator\", \"arguments\": \"{\\\"expression\\\": \\\"3\\\"}\"}</tool_call>"
               "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>",
     [("calculator", {"expression": "3"}), ("get_weather", {"city": "Rome"})], ""),
    ("llama3", "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Lima\"}}", [("get_weather", {"city": "Lima"})],
     ""),
    ("llama3", "<|python_tag|>{\"name\": \"calculator\", \"parameters\": {\"expression\": \"9\"}}; "
               "{\"name\": \"get_weather\", \"parameters\": {}}", [("calculator", {"expression": "9"}),
                                                                   ("get_weather", {})], ""),
])
def test_formats_parse_into_calls(fmt, text, expected, content) -> None:
    rest, calls = parse_tool_calls(text, fmt, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert rest == content
    assert all(c.id.startswith("call_") and c.to_openai()["type"] == "function" for c in calls)


@pytest.mark.parametrize("fmt, text", [
    ("hermes", "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>"),  # bad JSON
    ("hermes", "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>"),  # not an offered tool
    ("hermes", "<tool_call>{\"name\": \"calculator\", \"arguments\": [1, 2]}</tool_call>"),  # not an object
    ("deepseek", DS_CALL.replace("{\"city\": \"Paris\"}", "{city: Paris}")),  # one bad call: none are calls
    ("llama3", "The answer is {\"name\": 1}"),
    ("llama3", "{\"not\": \"a call\"}"),
])
def test_malformed_calls_stay_text(fmt, text) -> None:
    assert parse_tool_calls(text, fmt, TOOLS) == (text, [])


def test_calculator_is_arithmetic_only() -> None:
    assert calculator("123*456") == "56088" and calculator("(2+3)**2 / 5") == "5" and calculator("7 // 2") == "3"
    for bad in ["__import__('os')", "2**1000", "1/0", "x+1", "[1,2]"]:
        assert calculator(bad).startswith("error:"), bad


# ---------------------------------------------------------------------------------------------------- with models
@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Tokenizer folders of the DeepSeek-R1, Qwen2 and Llama-3 families (test_chat_template's)."""
    from test_chat_template import DEEPSEEK_SPECIAL_TOKENS, EXTRA_TOKENS, write_family

    from r1kit.tokenizer import train_bpe_tokenizer

    base = train_bpe_tokenizer(["the weather in Paris, what is two plus two? {\"city\": 3}"] * 4, 420,
                               special_tokens=DEEPSEEK_SPECIAL_TOKENS + EXTRA_TOKENS + ["<tool_call>", "</tool_call>"])
    return base, {name: write_family(base, tmp_path_factory.mktemp(name), name)
                  for name in ("deepseek_r1", "qwen2", "llama3")}


@pytest.mark.parametrize("family, text", [
    ("deepseek_r1", "ok</think>" + DS_CALL),
    ("qwen2", "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"}}</tool_call>"),
    ("llama3", "{\"name\": \"calculator\", \"parameters\": {\"expression\": \"2*3\"}}"),
])
def test_parser_reads_token_ids_with_special_markers(families, family, text) -> None:
    from r1kit.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(families[1][family])
    ids = tok.encode(text) + [tok.eos_id]
    assert "tool▁call" not in tok.decode(ids, skip_special_tokens=True)  # the markers are special tokens here
    content, calls = ToolCallParser(tok, TOOLS, "auto", [tok.eos_id]).parse(ids)
    assert calls and calls[-1].name == "calculator" and json.loads(calls[-1].arguments) == {"expression": "2*3"}
    assert ToolCallParser(tok, TOOLS, "get_weather", [tok.eos_id]).parse(ids) is None or family == "deepseek_r1"
    assert ToolCallParser(tok, TOOLS, "none").parse(ids) is None


@pytest.fixture(scope="module")
def qwen_server(families, tmp_path_factory):
    from http_helpers import serve
    from test_chat_template import write_family

    from r1kit.api import R1Model, random_checkpoint

    base, _ = families
    folder = write_family(base, random_checkpoint(tmp_path_factory.mktemp("m"), "tiny-dense", tokenizer=base),
                          "qwen2")
    model = R1Model.from_pretrained(folder, device="cpu", dtype="fp32")
    with serve(model) as (url, service):
        yield url, service, model, folder


def _post(url: str, body: dict) -> tuple[int, dict]:
    from http_helpers import request_json

    return request_json(url, "/v1/chat/completions", body)


def test_http_tools_rendered_and_tool_messages(qwen_server) -> None:
    import openai
    import transformers

    url, service, _, folder = qwen_server
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                       "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    expected = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    for stream in (False, True):
        out = client.chat.completions.create(model=service.model_name, messages=messages, tools=TOOLS, max_tokens=4,
                                             temperature=0, stream=stream, stream_options={"include_usage": True}
                                             if stream else None)
        if stream:
            chunks = list(out)
            usage = chunks[-1].usage
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert reasons == ["length"] or reasons == ["stop"]  # a random model makes no call: text, not a 500
        else:
            usage = out.usage
            assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("length", "stop")
        assert usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_http_bad_tools_are_400_naming_the_field(qwen_server, extra, param) -> None:
    url, service, _, _ = qwen_server
    status, body = _post(url, {"model": service.model_name, "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 2, **extra})
    assert status == 400 and body["error"]["param"] == param


def test_http_body_and_stream_turn_calls_into_tool_calls(families) -> None:
    """_chat_body / _tool_delta on a finished request whose tokens are a Hermes call (a random model makes none)."""
    from r1kit.serve.openai_api import _chat_body, _Meta, _tool_delta
    from r1kit.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(families[1]["qwen2"])
    text = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"6*7\"}}</tool_call>"
    handle = types.SimpleNamespace(text=text, token_ids=tok.encode(text), finish_reason="stop", completion_tokens=3,
                                   params=types.SimpleNamespace(logprobs=None), prompt_ids=[1])
    parser = ToolCallParser(tok, TOOLS, "auto", [tok.eos_id])
    body = _chat_body([handle], _Meta("id", "chat.completion", "m", [[1]]), tok.reasoning_parser, parser)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "calculator",
                                                              "arguments": "{\"expression\": \"6*7\"}"}
    delta, reason = _tool_delta(handle, parser, held=text)
    assert reason == "tool_calls" and delta["tool_calls"][0]["index"] == 0
    handle.token_ids = tok.encode("no call here")
    assert _tool_delta(handle, parser, held="no call here") == ({"content": "no call here"}, "stop")


def test_r1model_chat_with_tools(qwen_server) -> None:
    _, _, model, _ = qwen_server
    reply = model.chat([{"role": "user", "content": "2*3?"}], tools=TOOLS, max_new_tokens=3, temperature=0)
    assert reply.tool_calls == [] and reply.prompt_tokens == len(
        model.tokenizer.encode_chat([{"role": "user", "content": "2*3?"}], tools=TOOLS))
    with pytest.raises(ToolError):
        model.chat([{"role": "user", "content": "x"}], tools=TOOLS, tool_choice={"type": "function",
                                                                                 "function": {"name": "nope"}})


def test_agent_runs_calls_and_stops() -> None:
    class Scripted:  # answers with a calculator call, then with the tool's result
        def __init__(self):
            self.seen = []

        def chat(self, messages, tools, **kw):
            self.seen.append([dict(m) for m in messages])
            if messages[-1]["role"] == "tool":
                return types.SimpleNamespace(content=f"It is {messages[-1]['content']}.", tool_calls=[])
            return types.SimpleNamespace(content="", tool_calls=[ToolCall("calculator", '{"expression": "123*456"}')])

    model = Scripted()
    result = agent.run(model, [{"role": "user", "content": "123*456?"}], tools={"calculator": calculator})
    assert result.stopped == "answer" and result.steps == 2 and result.reply.content == "It is 56088."
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.messages[2]["tool_call_id"] == result.messages[1]["tool_calls"][0]["id"]

    class Looping(Scripted):
        def chat(self, messages, tools, **kw):
            return types.SimpleNamespace(content="", tool_calls=[ToolCall("div", '{"a": 1, "b": 0}')])

    def div(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    looped = agent.run(Looping(), [{"role": "user", "content": "1/0"}], tools={"div": div}, max_steps=3)
    assert looped.stopped == "max_steps" and looped.steps == 3
    assert looped.messages[2]["content"].startswith("error: ZeroDivisionError")
    assert agent.function_schema("div", div)["function"]["parameters"] == {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}


def test_cli_chat_with_tools(qwen_server, monkeypatch, capsys) -> None:
    from r1kit.__main__ import main

    _, _, _, folder = qwen_server
    lines = iter(["2*3?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(folder), "--tools", "calculator", "--max-new-tokens", "3", "--temperature", "0",
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    assert "r1kit chat:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["chat", str(folder), "--tools", "shell"])
    assert "unknown tool(s) shell" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- enforced
BOUNDED = [{"type": "function", "function": {"name": "get_weather", "parameters": {
               "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
               "required": ["city"], "additionalProperties": False}}},
           {"type": "function", "function": {"name": "calculator", "parameters": {
               "type": "object", "properties": {"expression": {"type": "string", "maxLength": 5}},
               "required": ["expression"], "additionalProperties": False}}}]


def _valid_calls(calls, names) -> bool:
    """Each call names one of ``names`` and its arguments validate against that tool's schema (jsonschema)."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED}
    for call in calls:
        call = call if isinstance(call, dict) else call.to_openai()
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    return bool(calls)


@pytest.mark.parametrize("family, text", [
    ("deepseek_r1", DS_CALL.replace("Paris", "Oslo").replace("2*3", "1+1")),
    ("qwen2", "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"}}\n</tool_call>\n"
              "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
    ("llama3", "{\"name\": \"calculator\", \"parameters\": {\"expression\": \"2*3\"}}"),
])
def test_call_grammar_accepts_the_format_and_refuses_other_text(families, family, text) -> None:
    """The grammar of tool_choice "required" takes the format's calls token by token (special markers as their
    tokens), ends there, and refuses plain text, an unknown function and arguments outside the schema."""
    import llguidance

    from r1kit.structured import GuideFactory
    from r1kit.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(families[1][family])
    parser = ToolCallParser(tok, BOUNDED, "required", [tok.eos_id])
    factory = GuideFactory(tok, tok.vocab_size, [tok.eos_id])

    def accepts(candidate: str) -> bool:
        matcher = factory.new(parser.constraint()).matcher
        return all(matcher.consume_token(t) for t in tok.encode(candidate)) and matcher.is_accepting()

    assert accepts(text) and _valid_calls(parse_tool_calls(text, parser.format, BOUNDED)[1], {"calculator",
                                                                                              "get_weather"})
    for bad in ["Sure, 2*3 is 6.", text.replace("calculator", "calculatrix"), text.replace("2*3", "2*3*4*5"),
                text.replace("Oslo", "Rome")]:
        if bad != text:
            assert not accepts(bad), bad
    named = ToolCallParser(tok, BOUNDED, "get_weather", [tok.eos_id]).constraint()["grammar"]
    assert "calculator" not in named and llguidance.LLMatcher.validate_grammar(
        llguidance.LLMatcher.grammar_from_lark(named)) == ""
    assert ToolCallParser(tok, BOUNDED, "auto").constraint() is None


@pytest.mark.parametrize("stream, choice", [(False, "required"),
                                           (True, {"type": "function", "function": {"name": "get_weather"}})])
def test_http_tool_choice_is_enforced(qwen_server, stream, choice) -> None:
    """A random model makes no call on its own (test_http_tools_rendered_and_tool_messages); with tool_choice
    "required" or a named function every answer is a valid call (finish_reason tool_calls), streamed or not."""
    import openai

    url, service, _, _ = qwen_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    names = {"calculator", "get_weather"} if choice == "required" else {"get_weather"}
    for seed in range(2):
        out = client.chat.completions.create(model=service.model_name, messages=[{"role": "user", "content": "hi"}],
                                             tools=BOUNDED, tool_choice=choice, max_tokens=120, temperature=1,
                                             seed=seed, stream=stream)
        if stream:
            chunks = [c.choices[0] for c in out if c.choices]
            calls = [call.model_dump() for c in chunks for call in c.delta.tool_calls or []]
            reason = chunks[-1].finish_reason
        else:
            calls, reason = [c.model_dump() for c in out.choices[0].message.tool_calls or []], \
                out.choices[0].finish_reason
        assert reason == "tool_calls" and _valid_calls(calls, names), (seed, calls, reason)


def test_tool_choice_refuses_a_second_constraint(qwen_server) -> None:
    url, service, model, _ = qwen_server
    status, body = _post(url, {"model": service.model_name, "messages": [{"role": "user", "content": "hi"}],
                               "tools": BOUNDED, "tool_choice": "required", "response_format": {"type": "json_object"},
                               "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "tool_choice"
    with pytest.raises(ToolError, match="does not combine with structured"):
        model.chat([{"role": "user", "content": "x"}], tools=BOUNDED, tool_choice="required",
                   structured={"type": "json_object"})


def test_r1model_chat_tool_choice_enforced_llama3(families, tmp_path) -> None:
    from test_chat_template import write_family

    from r1kit.api import R1Model, random_checkpoint

    base, _ = families
    folder = write_family(base, random_checkpoint(tmp_path, "tiny-dense", tokenizer=base, max_position_embeddings=2048),
                          "llama3")
    model = R1Model.from_pretrained(folder, device="cpu", dtype="fp32")
    reply = model.chat([{"role": "user", "content": "Weather?"}], tools=BOUNDED, max_new_tokens=80, seed=0,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(reply.tool_calls) == 1 and _valid_calls(reply.tool_calls, {"get_weather"})


# ---------------------------------------------------------------------------------------------------- gRPC
def _grpc_tool(tool: dict):
    from r1kit.serve.proto import r1kit_pb2 as pb

    f = tool["function"]
    return pb.Tool(name=f["name"], description=f.get("description", ""), parameters=json.dumps(f["parameters"]))


def test_grpc_tools_rendered_enforced_and_parsed(qwen_server) -> None:
    """Over a real gRPC channel: tools and tool messages rendered as over HTTP (same prompt tokens), tool_choice
    "required" / a name enforced (finish_reason TOOL_CALLS, valid calls, unary and streamed), bad tools and
    choices INVALID_ARGUMENT naming the field."""
    import grpc

    from r1kit.serve.client import R1Client
    from r1kit.serve.grpc_service import serve_grpc
    from r1kit.serve.proto import r1kit_pb2 as pb
    from r1kit.serve.proto import r1kit_pb2_grpc as pb_grpc

    _, service, model, _ = qwen_server
    history = [pb.ChatMessage(role="user", content="Weather in Paris?"),
               pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_1", name="get_weather",
                                                                        arguments="{\"city\": \"Paris\"}")]),
               pb.ChatMessage(role="tool", tool_call_id="call_1", content="21 C")]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    tools = [_grpc_tool(t) for t in BOUNDED]

    def request(choice: str, **sampling) -> pb.GenerateRequest:
        return pb.GenerateRequest(chat=pb.ChatPrompt(messages=history, tools=tools, tool_choice=choice),
                                  sampling=pb.SamplingOptions(**{"max_new_tokens": 120, "temperature": 1, "seed": 0,
                                                                 **sampling}))

    server = serve_grpc(service, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GeneratorStub(channel)
            free = stub.Generate(request("auto", max_new_tokens=3), timeout=300)
            with R1Client(f"127.0.0.1:{server.port}", timeout=300) as client:  # r1kit's Python gRPC client
                by_client = client.chat(messages, tools=BOUNDED, tool_choice="required", max_new_tokens=120,
                                        temperature=1, seed=1, logprobs=1)
            forced = stub.Generate(request("required"), timeout=300)
            streamed = list(stub.GenerateStream(request("get_weather"), timeout=300))
            errors = {}
            for name, bad in {"choice": request("nope"), "schema": pb.GenerateRequest(chat=pb.ChatPrompt(
                    messages=history, tools=[pb.Tool(name="f", parameters="{not json")])),
                    "both": request("required", json_object=True)}.items():
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(bad, timeout=300)
                errors[name] = (err.value.code(), err.value.details())
    finally:
        server.stop(grace=None)
    assert free.usage.prompt_tokens == len(model.tokenizer.encode_chat(messages, tools=BOUNDED))
    assert free.finish_reason == pb.FINISH_REASON_LENGTH and not free.tool_calls
    for reply, names in ((forced, {"calculator", "get_weather"}), (streamed[-1], {"get_weather"})):
        assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert _valid_calls([{"function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls],
                            names)
    assert all(not c.content for c in streamed[:-1])  # held back until the calls are known
    assert by_client.finish_reason == "tool_calls" and _valid_calls(by_client.tool_calls, {"calculator",
                                                                                           "get_weather"})
    assert len(by_client.logprobs) == by_client.completion_tokens
    assert by_client.prompt_tokens == free.usage.prompt_tokens
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in errors.values())
    assert "chat.tool_choice" in errors["choice"][1] and "'nope'" in errors["choice"][1]
    assert "chat.tools[0].parameters" in errors["schema"][1] and "tool_choice" in errors["both"][1]
