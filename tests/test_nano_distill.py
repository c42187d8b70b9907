"""The bundled student r1kit/nano-distill-qwen2 in Hugging Face Qwen2 format: transformers loads the model and the
tokenizer, the tokenizer encodes exactly as r1kit's (and as its teacher r1kit/nano's), and transformers' greedy
continuation equals r1kit's."""

from __future__ import annotations

import json

import pytest
import torch

from r1kit import R1Model
from r1kit.api import BUNDLED_DIR, resolve_model_path
from r1kit.generate import SamplingParams, generate_tokens
from r1kit.model.config import preset
from r1kit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

STUDENT = BUNDLED_DIR / "nano-distill-qwen2"
pytestmark = pytest.mark.skipif(not (STUDENT / "config.json").is_file(), reason="r1kit/nano-distill-qwen2 not bundled")

TEXTS = [
    "What is 47+38?",
    "def f(x):\n    return x**2  # square\n",
    "  leading spaces\tand\ttabs\n\n\nthree newlines   trailing ",
    "héllo wörld, naïve café; 中文 and an emoji 😀",
    "<think>\n7+8=15, write 5 carry 1, so far 5.\n</think>\n\n15<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>",
    "x=1_000_000; y = 3.14159e-10; z = {'a': [1, 2]}\r\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 3*4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 99-100?"},
     {"role": "assistant", "content": "<think>\nsteps\n</think>\n\n-1"}, {"role": "user", "content": "And 5+5?"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(STUDENT)


@pytest.fixture(scope="module")
def ours() -> R1Model:
    return R1Model.from_pretrained("r1kit/nano-distill-qwen2", device="cpu", dtype="fp32")


def test_the_folder_is_a_qwen2_checkpoint_r1kit_finds_by_name(ours):
    assert resolve_model_path("r1kit/nano-distill-qwen2") == STUDENT.resolve()
    config = json.loads((STUDENT / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((STUDENT / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    want = preset("nano-distill-qwen2")
    assert (ours.config.arch, ours.config.num_layers, ours.config.hidden_size, ours.config.num_kv_heads) == (
        want.arch, want.num_layers, want.hidden_size, want.num_kv_heads)
    assert 1e6 < ours.config.num_params() < 1e7  # a few million parameters


def test_autotokenizer_encodes_exactly_as_r1kit(hf_tokenizer, ours):
    assert not type(hf_tokenizer).__name__.startswith("Qwen2")  # Qwen2Tokenizer would re-split text
    teacher = Tokenizer.from_dir(BUNDLED_DIR / "nano") if (BUNDLED_DIR / "nano").is_dir() else None
    for text in TEXTS:
        want = ours.tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == want, text
        if teacher is not None:
            assert teacher.encode(text) == want, text  # the teacher's tokenizer: distillation needs the same ids
        assert hf_tokenizer.decode(want) == ours.tokenizer.decode(want)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (ours.tokenizer.bos_id, ours.tokenizer.eos_id)


def test_chat_template_renders_and_encodes_as_r1kit(hf_tokenizer, ours):
    for messages in CHATS:
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.tokenizer.encode_chat(messages)


def test_transformers_greedy_continuation_equals_r1kit(hf_tokenizer, ours):
    model = transformers.AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    prompts = [ours.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("What is 47+38?", "What is 305-918?", "What is 23*7?")]
    for ids in prompts:
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=120, do_sample=False,
                                eos_token_id=ours.stop_ids(), pad_token_id=hf_tokenizer.pad_token_id)
        theirs = hf[0, len(ids):].tolist()
        greedy = SamplingParams(max_new_tokens=120, temperature=0)
        mine = [step[0] for step in generate_tokens(ours.model, [ids], greedy, ours.stop_ids())]
        assert theirs == mine, ids
        assert "</think>" in hf_tokenizer.decode(theirs)  # a real answer, not an empty loop
