"""nano's calculator-tool stage: its chat template's tool section against transformers, and the training
conversations against what the agent loop sends and parses."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from r1kit.api import BUNDLED_DIR
from r1kit.tokenizer import DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE, Tokenizer
from r1kit.tools import CALCULATOR, ToolCall, ToolCallParser, calculator, tool_format
from r1kit.train.config import TrainConfig, TrainConfigError
from r1kit.train.data import Problem, chat_example, sample_problem
from r1kit.train.tool_data import call_text, tool_documents, tool_stream

NANO = BUNDLED_DIR / "nano"
pytestmark = pytest.mark.skipif(not (NANO / "tokenizer.json").is_file(), reason="r1kit/nano is not bundled")
CALL = ToolCall("calculator", json.dumps({"expression": "47*38"}), id="call_0").to_openai()
CONVERSATIONS = {
    "offered": [{"role": "user", "content": "What is 47*38?"}],
    "result": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 47*38?"},
               {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_1"}]},
               {"role": "tool", "tool_call_id": "call_0", "content": "1786"},
               {"role": "tool", "tool_call_id": "call_1", "content": "1786"}],
    "answered": [{"role": "user", "content": "What is 47*38?"},
                 {"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "call_0", "content": "1786"},
                 {"role": "assistant", "content": "1786"}, {"role": "user", "content": "And 2+2?"}],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """nano's tokenizer files with the tool template (what `package_nano.py --tools-base` writes)."""
    out = tmp_path_factory.mktemp("nano_tools")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(NANO / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_dir(folder)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tool_template_renders_as_transformers(folder, tok, name) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    render = transformers.utils.chat_template_utils.render_jinja_template  # keeps content=None, as agent.run sends
    expected = render([CONVERSATIONS[name]], tools=[CALCULATOR], chat_template=theirs.chat_template,
                      add_generation_prompt=True, **theirs.special_tokens_map)[0][0]
    assert theirs.apply_chat_template(CONVERSATIONS[name], tools=[CALCULATOR], add_generation_prompt=True,
                                      tokenize=False) == expected  # which drops it: the template needs neither
    assert tok.apply_chat_template(CONVERSATIONS[name], tools=[CALCULATOR]) == expected
    assert tok.encode_chat(CONVERSATIONS[name], tools=[CALCULATOR]) == theirs(expected, add_special_tokens=False)[
        "input_ids"]
    assert (call_text("47*38") in expected) == (name != "offered") and "<tools>\n{" in expected
    assert tool_format(tok) == "hermes" and tok.reasoning == "prompt"


def test_without_tools_it_is_the_builtin_r1_format(tok) -> None:
    builtin = _builtin(tok)
    rng = random.Random(0)
    messages = [[{"role": "user", "content": sample_problem(rng, kind, "val").question}]
                for kind in ("add2", "sub3", "mul2x2")]
    messages.append([{"role": "system", "content": "Be brief."}, *messages[0],
                     {"role": "assistant", "content": "85"}, {"role": "user", "content": "Sure?"}])
    for m in messages:
        for thinking in (True, False):
            assert tok.apply_chat_template(m, thinking=thinking) == builtin.apply_chat_template(m, thinking=thinking)
            assert tok.encode_chat(m, thinking=thinking) == builtin.encode_chat(m, thinking=thinking)


def _builtin(tok: Tokenizer) -> Tokenizer:
    """The same vocabulary with the built-in R1 format (no template)."""
    return Tokenizer(tok._backend, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token)


def test_tool_documents_are_what_the_agent_sends_and_parse_back(tok) -> None:
    problem = Problem(47, "*", 38)
    (ids1, mask1), (ids2, mask2) = tool_documents(problem, "mul2x2", tok)
    prompt1 = tok.encode_chat(CONVERSATIONS["offered"], tools=[CALCULATOR])
    assert ids1[:len(prompt1)] == prompt1 and mask1 == [0] * len(prompt1) + [1] * (len(ids1) - len(prompt1))
    parser = ToolCallParser(tok, [CALCULATOR], "auto", [tok.eos_id])
    content, calls = parser.parse(ids1[len(prompt1):])
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("calculator", {"expression": "47*38"})]
    sent = [*CONVERSATIONS["offered"], {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_0", "content": calculator("47*38")}]  # as agent.run builds it
    prompt2 = tok.encode_chat(sent, tools=[CALCULATOR])
    assert ids2[:len(prompt2)] == prompt2 and sum(mask2) == len(ids2) - len(prompt2)
    assert tok.decode(ids2[len(prompt2):]).endswith("</think>\n\n1786<｜end▁of▁sentence｜>")
    assert call_text("47*38") in tok.apply_chat_template(sent, tools=[CALCULATOR])
    add = Problem(47, "+", 38)
    [(ids, mask)] = tool_documents(add, "add2", tok)  # answered in the head: the completion of the plain data
    plain_ids, plain_mask = chat_example(add, tok)
    completion = [i for i, m in zip(plain_ids, plain_mask, strict=True) if m]
    assert [i for i, m in zip(ids, mask, strict=True) if m] == completion


def test_tool_stream_and_config(tok) -> None:
    stream = tool_stream(tok, 6, seed=0, kinds={"mul3x3": 1.0}, split="val")
    assert 0 < float(stream.mask.float().mean()) < 1
    with pytest.raises(ValueError, match="unknown"):
        tool_stream(tok, 2, seed=0, kinds={"mul4x4": 1.0})
    for recipe in ("configs/nano-tools.yaml", "configs/nano-tools-2.yaml", "configs/nano-tools-3.yaml"):
        cfg = TrainConfig.from_yaml(recipe)
        assert cfg.data.mixture["tools"] > 0 and "mul2x2" in cfg.data.tool_kinds, recipe
    with pytest.raises(TrainConfigError, match="tool_kinds"):
        TrainConfig.from_dict({"data": {"mixture": {"tools": 1.0}, "tool_kinds": {"mul9": 1.0}}})
