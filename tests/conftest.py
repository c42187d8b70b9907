"""Shared fixtures for the model, checkpoint and parity tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from r1kit.checkpoint import save_model
from r1kit.model.config import preset
from r1kit.model.transformer import Transformer

# The test models are tiny: one intra-op thread is as fast, and it keeps the suite's run time stable when
# other processes share the (2-core) machine, where spinning OpenMP workers slow tiny ops down 10-100x.
torch.set_num_threads(1)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15, bias_std: float = 0.3) -> torch.nn.Module:
    """Re-draw every parameter and the routing bias so that nothing is trivially zero or one.

    Matrices get N(0, std) (about 1/sqrt(hidden) for the tiny models, so activations stay O(1) and routing
    decisions vary from token to token), norm weights 1 + N(0, 0.1), biases N(0, 0.1) and DeepSeek-V3's
    e_score_correction_bias N(0, bias_std), large enough to change which experts win.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, s: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen) * s + mean).to(t.dtype)

    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.copy_(draw(p, 0.1, 1.0))
        elif p.ndim == 1:
            p.copy_(draw(p, 0.1))
        else:
            p.copy_(draw(p, std))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(draw(b, bias_std))
    return model


@pytest.fixture(scope="session")
def randomize_weights() -> Callable[..., torch.nn.Module]:
    """The `randomize` function, for tests that build models themselves (e.g. Hugging Face ones)."""
    return randomize


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    """A saved tiny-moe checkpoint (random weights, nano's tokenizer) for the compression tests; read-only."""
    nano = Path(__file__).resolve().parents[1] / "r1kit" / "nano"
    model = randomize(Transformer(preset("tiny-moe", vocab_size=4096)).init_weights(0), 0, 0.15).eval()
    src = tmp_path_factory.mktemp("src") / "tiny"
    save_model(model, src, dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(nano / name, src / name)
    return src


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """make_model(name="tiny-moe", seed=0, std=0.15, **overrides) -> a fresh fp32 Transformer in eval mode.

    Weights come from `randomize` (std=None keeps r1kit's own init_weights). Each call builds a new model,
    so a test may change it (MLA impl, MoE reference flag, dtype) without affecting other tests.
    """

    def build(name: str = "tiny-moe", seed: int = 0, std: float | None = 0.15, **overrides) -> Transformer:
        model = Transformer(preset(name, **overrides)).init_weights(seed)
        if std is not None:
            randomize(model, seed, std)
        return model.eval()

    return build


@pytest.fixture
def aligned_model(make_model):
    """aligned_model(name, **overrides): a model whose MTP drafts are good (speculative decoding tests): one
    layer, its MTP module a copy of it reading only the next embedding."""

    @torch.no_grad()
    def build(name: str = "tiny-moe", **overrides):
        model = make_model(name, num_layers=1, first_k_dense_replace=0, num_mtp_layers=1, **overrides)
        layer, mtp = model.layers[0], model.mtp[0]
        mtp.block.load_state_dict(layer.state_dict())
        c = model.config.hidden_size
        mtp.eh_proj.weight.copy_(torch.cat((torch.eye(c), torch.zeros(c, c)), dim=1))  # keep enorm(embed(x[t+1]))
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head_norm.weight.copy_(model.norm.weight)
        emb = model.embed_tokens.weight
        emb.mul_(emb.pow(2).mean(-1, keepdim=True).rsqrt())  # unit RMS: enorm leaves the embeddings as they are
        return model

    return build


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A CLI run that failed as r1kit's errors should: exit 2, one `error: ` line holding words, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
