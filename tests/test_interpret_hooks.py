"""Hook points (r1kit.model.hooks): names, capture, patching against hand computations, zero cost when unused."""

from __future__ import annotations

import pytest
import torch

from r1kit.model.attention import apply_rope
from r1kit.model.hooks import UnknownHookError

IDS = torch.tensor([[3, 17, 42, 5, 99, 7, 11, 250]])  # (1, 8)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_names_follow_transformer_lens(make_model, name):
    model = make_model(name)
    points = model.hook_points()
    for L in range(model.config.num_layers):
        for hook in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                     "attn.hook_pattern", "attn.hook_z"):
            assert f"blocks.{L}.{hook}" in points
    if name == "tiny-moe":
        assert "blocks.0.attn.hook_kv_latent" in points
        assert "blocks.0.moe.hook_router_scores" not in points  # first_k_dense_replace=1: layer 0 is dense
        assert {"blocks.1.moe.hook_router_scores", "blocks.1.moe.hook_topk_experts"} <= set(points)


def test_misspelt_name_lists_close_names(make_model):
    model = make_model("tiny-moe")
    with pytest.raises(UnknownHookError, match=r"blocks\.1\.attn\.hook_pattern") as err:
        model.run_with_hooks(IDS, hooks=[("blocks.1.attn.hook_patern", lambda x, h: None)])
    assert "hook_patern" in str(err.value)
    with pytest.raises(UnknownHookError, match="blocks.2.hook_resid_post"):
        model.run_with_cache(IDS, names=["blocks.2.hook_resid_pots"])
    assert all(not p.fns for p in model.hook_points().values())  # nothing left attached after the error


@torch.no_grad()
def test_cache_is_consistent_and_unused_hooks_change_nothing(make_model):
    model = make_model("tiny-moe")
    plain = model(IDS)
    logits, cache = model.run_with_cache(IDS)  # every point, the pattern through the explicit softmax
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    for L in range(model.config.num_layers):
        c, b = cache, f"blocks.{L}."
        torch.testing.assert_close(c[b + "hook_resid_mid"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"])
        torch.testing.assert_close(c[b + "hook_resid_post"], c[b + "hook_resid_mid"] + c[b + "hook_mlp_out"])
        pattern = cache[b + "attn.hook_pattern"]  # (1, H, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert pattern.triu(1).abs().max() == 0  # causal
    # the final norm + head on the last resid_post is the output
    last = cache[f"blocks.{model.config.num_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(model.lm_head(model.norm(last)), plain, rtol=1e-5, atol=1e-5)
    assert all(not p.fns for p in model.hook_points().values())


@torch.no_grad()
def test_zeroing_a_head_matches_the_hand_computation(make_model):
    """Zero head h of the last layer's z: by hand, resid_mid loses that head's slice of o_proj, then the MLP
    and the head run again on the changed residual."""
    model = make_model("tiny-moe")
    L, h = model.config.num_layers - 1, 2
    _, cache = model.run_with_cache(IDS, names=[f"blocks.{L}.attn.hook_z", f"blocks.{L}.hook_resid_mid"])
    z = cache[f"blocks.{L}.attn.hook_z"]  # (1, T, H, dv)
    dv = z.shape[-1]
    w_o = model.layers[L].self_attn.o_proj.weight[:, h * dv:(h + 1) * dv]  # (C, dv)
    mid = cache[f"blocks.{L}.hook_resid_mid"] - z[:, :, h] @ w_o.T
    block = model.layers[L]
    post = mid + block.mlp(block.post_attention_layernorm(mid))
    by_hand = model.lm_head(model.norm(post))

    def zero_head(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        z[:, :, h] = 0
        return z

    patched = model.run_with_hooks(IDS, hooks=[(f"blocks.{L}.attn.hook_z", zero_head)])
    torch.testing.assert_close(patched, by_hand, rtol=1e-5, atol=1e-5)
    assert (patched - model(IDS)).abs().max() > 1e-3  # the patch did something


@torch.no_grad()
def test_patching_resid_and_routes(make_model):
    """A replaced residual stream propagates (output = the later layers on the patch); the captured routes are
    the router's top-k computed by hand."""
    model = make_model("tiny-moe")
    _, cache = model.run_with_cache(IDS, names=["blocks.1.hook_resid_post", "blocks.1.moe.hook_topk_experts",
                                                "blocks.1.moe.hook_router_scores"])
    scores = cache["blocks.1.moe.hook_router_scores"]  # (T, E)
    gate = model.layers[1].mlp.gate
    assert scores.shape == (IDS.shape[1], gate.n_experts)
    _, idx = gate.route(scores)
    assert (cache["blocks.1.moe.hook_topk_experts"].sort(-1).values == idx.sort(-1).values).all()
    noise = torch.randn_like(cache["blocks.1.hook_resid_post"])
    patched = model.run_with_hooks(IDS, hooks=[("blocks.1.hook_resid_post", lambda x, h: noise)])
    x, T = noise, IDS.shape[1]
    rope = model.rotary(torch.arange(T)[None], x.dtype)
    x = model.layers[2](x, rope, None)
    torch.testing.assert_close(patched, model.lm_head(model.norm(x)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gqa_pattern_equals_softmax_by_hand(make_model):
    model = make_model("tiny-dense")
    _, cache = model.run_with_cache(IDS, names=["blocks.1.hook_resid_mid", "blocks.1.hook_resid_pre",
                                                "blocks.1.attn.hook_pattern"])
    attn = model.layers[1].self_attn
    x = model.layers[1].input_layernorm(cache["blocks.1.hook_resid_pre"])[0]  # (T, C)
    T, H, Hkv, D = x.shape[0], attn.n_heads, attn.n_kv, attn.head_dim
    cos, sin = model.rotary(torch.arange(T)[None], x.dtype)
    q = apply_rope((x @ attn.q_proj.weight.T).view(1, T, H, D), cos, sin, False)[0]  # (T, H, D)
    k = apply_rope((x @ attn.k_proj.weight.T).view(1, T, Hkv, D), cos, sin, False)[0]
    for head in range(H):
        s = q[:, head] @ k[:, head // (H // Hkv)].T / D**0.5  # (T, T)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"][0, head], s.softmax(-1))


@torch.no_grad()
def test_mla_pattern_same_naive_absorbed_and_cached(make_model):
    """The captured pattern is the same whichever MLA path runs, and a KV-cache decode captures the full
    pattern's last row."""
    model = make_model("tiny-moe")
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(model.config.num_layers)]
    model.set_mla_impl("naive")
    _, naive = model.run_with_cache(IDS, names=names)
    model.set_mla_impl("absorb")
    _, absorbed = model.run_with_cache(IDS, names=names)
    model.set_mla_impl("auto")
    cache = model.new_cache(1, 16)
    model(IDS[:, :-1], cache)
    _, step = model.run_with_cache(IDS[:, -1:], names=names, cache=cache)
    for n in names:
        torch.testing.assert_close(absorbed[n], naive[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step[n][0, :, 0], naive[n][0, :, -1], rtol=1e-5, atol=1e-6)
