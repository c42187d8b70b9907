"""R1Model and the CLI: text generation, streaming, stop strings, chat reasoning, name resolution, errors.

Text-level behaviour is tested with a scripted model (it emits a fixed token sequence whatever the input,
as nanochat tests its engine) so that outputs such as "<think>...</think>answer" are known exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from r1kit.__main__ import main
from r1kit.api import ModelNotFoundError, R1Model, random_checkpoint, resolve_model_path
from r1kit.generate import GenerationError
from r1kit.model.attention import KVCache
from r1kit.model.config import preset
from r1kit.model.transformer import ContextLengthError
from r1kit.tokenizer import DEEPSEEK_EOS, train_bpe_tokenizer

CORPUS = ["The answer is 391. Let me think step by step: 17 times 23 is 17*20 + 17*3 = 340 + 51 = 391.",
          "def forward(self, x):\n    return self.proj(x)\n", "Quantum entanglement links particles. " * 3]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


class ScriptedModel(nn.Module):
    """Emits `script[i]` as the i-th generated token (greedy), whatever the prompt."""

    def __init__(self, script: list[int], vocab: int, eos: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.config = preset("tiny-dense", vocab_size=vocab, eos_token_id=eos)
        self.embed_tokens = nn.Embedding(vocab, 4)

    def new_cache(self, batch: int, max_len: int, pad=None) -> KVCache:
        self.step = 0  # one generation at a time
        return KVCache(layers=[], max_len=max_len, pad=pad)

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        step = self.step
        self.step += 1
        cache.pos += ids.shape[1]
        logits = torch.full((ids.shape[0], 1, self.vocab), -1e9)
        logits[:, :, self.script[min(step, len(self.script) - 1)]] = 0.0
        return logits


def scripted(tok, text: str) -> R1Model:
    ids = tok.encode(text) + [tok.eos_id]
    model = R1Model(ScriptedModel(ids, tok.vocab_size, tok.eos_id), tok)
    model.use_engine = False  # the mock speaks the KV-cache loop's interface; the text layer is the same
    return model


def test_generate_stream_batch_and_stop_strings(tok):
    model = scripted(tok, "The answer is 391. Let me think")
    full = model.generate(prompt="Q", max_new_tokens=50, temperature=0)
    assert full == "The answer is 391. Let me think"  # ends at eos, which is not part of the text
    assert "".join(model.generate(prompt="Q", max_new_tokens=50, temperature=0, stream=True)) == full
    assert model.generate(prompt=["Q", "another"], max_new_tokens=50, temperature=0) == [full, full]
    # a stop string is cut out, also when it spans several tokens, and also while streaming
    assert model.generate(prompt="Q", max_new_tokens=50, temperature=0, stop="391") == "The answer is "
    pieces = list(model.generate(prompt="Q", max_new_tokens=50, temperature=0, stop=[". Let"], stream=True))
    assert "".join(pieces) == "The answer is 391"
    for stop in ("is 391", "answer is 391", "The answer is 391. Let me"):  # longer than the text held so far
        assert model.generate(prompt="Q", max_new_tokens=50, temperature=0, stop=stop) == full[:full.index(stop)]
        streamed = list(model.generate(prompt="Q", max_new_tokens=50, temperature=0, stop=stop, stream=True))
        assert "".join(streamed) == full[:full.index(stop)]
    # max_length counts the prompt: the budget is max_length - len(prompt tokens)
    n_prompt = len(model._encode("Q"))
    short = model.generate(prompt="Q", max_length=n_prompt + 2, temperature=0)
    assert tok.encode(short) == tok.encode(full)[:2]


def test_chat_separates_reasoning(tok):
    model = scripted(tok, "17 times 23 is 391.</think>\n\nThe answer is 391.")
    reply = model.chat([{"role": "user", "content": "What is 17*23?"}], temperature=0)
    assert reply.reasoning == "17 times 23 is 391."
    assert reply.content == "The answer is 391."
    assert reply.completion_tokens == len(tok.encode(reply.text)) + 1  # + the eos token
    truncated = scripted(tok, "17 times 23 is").chat([{"role": "user", "content": "?"}], max_new_tokens=3,
                                                       temperature=0)
    assert truncated.content == "" and truncated.reasoning  # still thinking when the budget ran out


def test_generate_runs_on_the_engine_like_the_reference_loop(tok, tmp_path):
    """R1Model.generate runs on the LLMEngine; the plain KV-cache loop is its reference (greedy: equal text
    for a batch of prompts of different lengths, streamed or not); an abandoned stream frees its KV blocks."""
    model = R1Model.from_pretrained(random_checkpoint(tmp_path / "m", "tiny-moe", tokenizer=tok), dtype="fp32")
    prompts = ["def forward(self, x):", "import", "class Engine:\n    def step(self)"]
    got = model.generate(prompt=prompts, max_new_tokens=12, temperature=0)
    engine = model.engine()
    assert engine.num_steps > 0 and not engine.has_unfinished()
    model.use_engine = False
    assert model.generate(prompt=prompts, max_new_tokens=12, temperature=0) == got
    model.use_engine = True
    free = engine.block_manager.num_free_blocks
    stream = model.generate(prompt=prompts[0], max_new_tokens=40, temperature=0, stream=True)
    next(stream)
    assert engine.has_unfinished() and engine.block_manager.num_free_blocks < free
    stream.close()  # the consumer went away: its request is aborted
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == free
    assert model.generate(prompt=prompts[0], max_new_tokens=12, temperature=0) == got[0]


def test_speculative_generate_through_the_api():
    """generate(speculative=True) drafts with nano's MTP head, on the engine (a batch too) and on the reference
    loop: greedy text equal to the engine's (fp32, where the arithmetic is exact enough for ties not to flip),
    acceptance reported; the reference loop refuses batches."""
    model = R1Model.from_pretrained("r1kit/nano", dtype="fp32")
    messages = [{"role": "user", "content": "What is 47+38?"}]
    plain = model.chat(messages, temperature=0, max_new_tokens=48)
    for use_engine in (True, False):
        model.use_engine = use_engine
        fast = model.chat(messages, temperature=0, max_new_tokens=48, speculative=True)
        assert fast == plain
        stats = model.speculative_stats
        assert stats.accepted > 0 and 0.5 < stats.acceptance_rate <= 1  # arithmetic traces are easy to draft
        # fewer forwards than tokens (the engine samples the first token in the prefill, before any round)
        assert stats.accepted + stats.rounds + use_engine >= plain.completion_tokens > stats.rounds
    with pytest.raises(GenerationError, match="batch 1"):
        model.generate(prompt=["a", "b"], speculative=True)
    model.use_engine = True
    prompts = ["def add(a, b):", "import os"]
    assert model.generate(prompt=prompts, max_new_tokens=16, temperature=0, speculative=True) == model.generate(
        prompt=prompts, max_new_tokens=16, temperature=0)


def test_real_checkpoint_round_trip_through_api(tok, tmp_path):
    path = random_checkpoint(tmp_path / "m", "tiny-moe", tokenizer=tok)
    model = R1Model.from_pretrained(path, device="cpu", dtype="fp32")
    assert model.dtype == torch.float32 and model.tokenizer.vocab_size == tok.vocab_size
    a = model.generate(prompt="def forward", max_new_tokens=8, temperature=0)
    assert a == model.generate(prompt="def forward", max_new_tokens=8, temperature=0)
    assert "".join(model.generate(prompt="def forward", max_new_tokens=8, temperature=0, stream=True)) == a
    info = model.info()
    cfg = preset("tiny-moe")  # counted as DeepSeek does: the main model, and the MTP module as stored
    assert (info["params_total"], info["params_mtp"]) == (cfg.num_params(), cfg.num_mtp_params())
    with pytest.raises(ContextLengthError, match="context"):
        model.generate(prompt="x " * 600, max_new_tokens=600)
    with pytest.raises(GenerationError, match="temperature"):
        model.generate(prompt="x", temperature=-1)
    with pytest.raises(GenerationError, match="exactly one"):
        model.generate()


def test_name_resolution(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download deepseek-ai/X"):
        resolve_model_path("deepseek-ai/X")
    with pytest.raises(ModelNotFoundError, match="not bundled"):
        resolve_model_path("r1kit/does-not-exist")
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--org--name" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--name" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("org/name") == snap
    with pytest.raises(ValueError, match="quantization"):
        R1Model.from_pretrained(snap, quantization="int3")


def test_cli(tok, tmp_path, capsys):
    assert main(["info", "deepseek-v3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] > 6.7e11 and 3.6e10 < info["params_active"] < 3.8e10
    path = random_checkpoint(tmp_path / "m", "tiny-dense", tokenizer=tok)
    assert main(["generate", str(path), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0",
                 "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == R1Model.from_pretrained(path, dtype="fp32").generate(
        prompt="def", max_new_tokens=4, temperature=0).strip()
    assert main(["convert", str(path), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert DEEPSEEK_EOS in tok.decode([tok.eos_id])


def test_cli_chat_session(tok, tmp_path, monkeypatch, capsys):
    path = random_checkpoint(tmp_path / "m", "tiny-dense", tokenizer=tok)
    lines = iter(["What is 17*23?", "/reset", "", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(path), "--max-new-tokens", "5", "--temperature", "0", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("r1kit chat:") and "/exit" in out
    assert next(lines, None) is None  # every line was read: two questions answered, then /exit


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_from_pretrained_quantized(tok, tmp_path, method):
    path = random_checkpoint(tmp_path / "m", "tiny-dense", tokenizer=tok)
    full = R1Model.from_pretrained(path, dtype="bf16")
    quant = R1Model.from_pretrained(path, dtype="bf16", quantization=method)
    assert quant.info()["weights_MiB"] < full.info()["weights_MiB"]
    ids = torch.tensor([tok.encode("def forward(self, x):")])
    with torch.no_grad():
        a, b = full.model(ids).float(), quant.model(ids).float()
    assert (a - b).norm() / a.norm() < {"int8": 0.03, "fp8": 0.08, "int4": 0.3}[method]
    assert isinstance(quant.generate(prompt="def", max_new_tokens=4, temperature=0), str)
