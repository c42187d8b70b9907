"""r1kit.interpret: each analysis against a hand computation or a naive loop, errors, and `r1kit explain` on nano
(DeepSeek-V3-shaped: MLA + MoE) and the bundled Qwen2 (GQA, dense) model."""

from __future__ import annotations

import json

import pytest
import torch

from r1kit.interpret import ablation, attribution, counterfactual
from r1kit.interpret.attribution import QuadraticLimitError, check_length
from r1kit.interpret.explain import ExplainConfig, TargetError, explain, target_ids
from r1kit.model.config import preset
from r1kit.model.transformer import Transformer

IDS = torch.tensor([[3, 17, 42, 5, 99, 7, 11, 250, 31, 8]])  # (1, 10): prompt of 7, 3 "generated"
P = 7


@pytest.fixture(scope="module")
def tiny():
    from conftest import randomize

    return randomize(Transformer(preset("tiny-moe", num_layers=2)).init_weights(0)).eval()


def test_rollout_and_flow_by_hand():
    torch.manual_seed(0)
    pat = torch.rand(2, 3, 4, 4).tril()
    pat = pat / pat.sum(-1, keepdim=True)  # (L=2, H=3, N=4, N) causal rows
    A = 0.5 * pat.mean(1) + 0.5 * torch.eye(4)
    rollout = attribution.attention_rollout(pat, 2)  # rows: queries 1, 2; columns: prompt 0, 1
    torch.testing.assert_close(rollout, (A[1] @ A[0])[1:3, :2])
    # two layers: flow from (2, q) to (0, j) = sum over middle nodes m of min(A1[q, m], A0[m, j])
    flow = attribution.attention_flow(pat, 2)
    for g, q in enumerate((1, 2)):
        for j in range(2):
            hand = sum(min(float(A[1, q, m]), float(A[0, m, j])) for m in range(4))
            assert abs(float(flow[g, j]) - hand) < 1e-5


def test_chain_through_generation_by_hand():
    full = torch.tensor([[2.0, 0.0, 0.0, 0.0],  # generated token 0: all from prompt token 0 (|row| = 2)
                         [0.2, 0.1, 0.7, 0.0]])  # token 1: 0.7 through generated token 0
    chained = attribution.chain_through_generation(full, 2)
    torch.testing.assert_close(chained, torch.tensor([[2.0, 0.0], [0.9, 0.1]]))


def test_top_paths_find_the_planted_path():
    pat = torch.zeros(2, 2, 4, 4)
    pat[:, :, torch.arange(4), torch.arange(4)] = 1.0  # everyone attends to itself ...
    pat[0, 1, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # ... but layer 0 head 1 moves token 1 to position 2
    pat[1, 0, 2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    paths = attribution.top_paths(pat, 2, k=2)  # prompt 0, 1; the token at 3 is predicted at position 2
    best = paths[1][0]
    assert best["positions"] == [1, 2, 2] and best["hops"][0]["head"] == 1 and best["hops"][1]["head"] is None
    assert abs(best["score"] - 0.25) < 1e-6  # A0[2, 1] = 0.5 * mean(0, 1), A1[2, 2] = 0.5 * 1 + 0.5


def test_integrated_gradients_equal_a_naive_riemann_sum(tiny):
    ig = attribution.integrated_gradients(tiny, IDS, P, steps=4)  # (3, 7)
    embed = tiny.embed_tokens(IDS).detach()
    total = torch.zeros(3, IDS.shape[1])
    for alpha in (0.125, 0.375, 0.625, 0.875):
        x = (alpha * embed).requires_grad_(True)
        logits = tiny.run_with_hooks(IDS, hooks=[("hook_embed", lambda e, h, x=x: x)])
        lp = logits[0, P - 1:-1].log_softmax(-1).gather(-1, IDS[0, P:, None])[:, 0]  # (3,)
        for g in range(3):
            (grad,) = torch.autograd.grad(lp[g], x, retain_graph=True)
            total[g] += (embed[0] * grad[0]).sum(-1) / 4
    torch.testing.assert_close(ig, total[:, :P], rtol=1e-4, atol=1e-5)


def test_grad_x_attention_matches_finite_differences(tiny):
    """One layer's gradient of the target logit w.r.t. one attention weight, by perturbing it through the hook."""
    cam = attribution.grad_x_attention(tiny, IDS, P)
    assert cam.shape == (3, P) and (cam >= 0).all() and cam.sum() > 0
    names = attribution.pattern_names(tiny)
    with torch.enable_grad():
        logits, cache = tiny.run_with_cache(IDS, names=names, detach=False)
        (grad,) = torch.autograd.grad(logits[0, P - 1, IDS[0, P]], cache[names[1]])
    eps, (h, q, j) = 1e-2, (1, P - 1, 2)

    def bump(a: torch.Tensor, hook) -> torch.Tensor:
        a = a.clone()
        a[0, h, q, j] += eps
        return a

    with torch.no_grad():
        up = tiny.run_with_hooks(IDS, hooks=[(names[1], bump)])[0, P - 1, IDS[0, P]]
        base = tiny(IDS)[0, P - 1, IDS[0, P]]
    assert abs(float((up - base) / eps) - float(grad[0, h, q, j])) < 1e-2 * max(1.0, abs(float(grad[0, h, q, j])))


@torch.no_grad()
def test_batched_ablation_equals_single_runs(tiny):
    heads = {(r["layer"], r["head"]): r["delta"] for r in ablation.ablate_heads(tiny, IDS, P, "mean")}
    experts = {(r["layer"], r["expert"]): r["delta"] for r in ablation.ablate_experts(tiny, IDS, P)}
    assert len(heads) == 2 * 4 and len(experts) == 8  # layer 0 is dense
    clean = float(ablation.target_logprob(tiny(IDS), IDS, P)[0])

    def mean_head(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        z[:, :, 3] = z[:, :, 3].mean(1, keepdim=True)
        return z

    one = tiny.run_with_hooks(IDS, hooks=[("blocks.1.attn.hook_z", mean_head)])
    assert abs(float(ablation.target_logprob(one, IDS, P)[0]) - clean - heads[(1, 3)]) < 1e-4
    seen = {}
    one = tiny.run_with_hooks(IDS, hooks=[("blocks.1.moe.hook_topk_experts", lambda i, h: seen.update(i=i)),
                                          ("blocks.1.moe.hook_expert_weights",
                                           lambda w, h: w.masked_fill(seen["i"] == 5, 0.0))])
    assert abs(float(ablation.target_logprob(one, IDS, P)[0]) - clean - experts[(1, 5)]) < 1e-4


@torch.no_grad()
def test_activation_patching(tiny):
    clean, corrupted = IDS[:, :P], IDS[:, :P].clone()
    corrupted[0, 2] = 400
    out = counterfactual.activation_patching(tiny, clean, corrupted)
    effect = torch.tensor(out["effect"])  # (L, P)
    assert effect.shape == (2, P)
    torch.testing.assert_close(effect[0, 2], torch.tensor(1.0))  # layer 0 at the edited token: the corrupted run
    assert effect[0, :2].abs().max() < 1e-5  # positions before the edit carry nothing of it
    _, cache = tiny.run_with_cache(corrupted, names=["blocks.1.hook_resid_pre"])
    one = tiny.run_with_hooks(clean, hooks=[("blocks.1.hook_resid_pre",
                                             counterfactual.patch_resid(cache, 1, [4]))])[0, -1]
    a, b = out["clean_token"], out["corrupted_token"]
    hand = (float(one[a] - one[b]) - out["logit_diff_clean"]) / (out["logit_diff_corrupted"] - out["logit_diff_clean"])
    assert abs(hand - float(effect[1, 4])) < 1e-3
    with pytest.raises(ValueError, match="equal token length"):
        counterfactual.activation_patching(tiny, clean, IDS[:, :P + 1])


@torch.no_grad()
def test_substitutions_change_the_answer(tiny):
    edits = counterfactual.token_substitutions(tiny, IDS[:, :P], list(range(P)), candidates=4)
    base = int(tiny(IDS[:, :P])[0, -1].argmax())
    assert edits
    for e in edits[:3]:
        row = IDS[:, :P].clone()
        row[0, e["position"]] = e["to"]
        assert int(tiny(row)[0, -1].argmax()) == e["new_token"] != base


def test_limits_and_config_errors():
    with pytest.raises(QuadraticLimitError, match="300 tokens exceed the limit of 256"):
        check_length(300, 256, "rollout")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ig_stepz'\]"):
        ExplainConfig.from_dict({"ig_stepz": 3})
    with pytest.raises(ValueError, match="unknown method"):
        ExplainConfig.from_dict({"methods": ["rollout", "shap"]})


@pytest.fixture(scope="module")
def nano():
    from r1kit.api import R1Model

    return R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")


FAST = dict(max_new_tokens=4, ig_steps=4, top_paths=2, substitution_candidates=2)


def test_explain_nano_schema_and_errors(nano):
    r = explain(nano, "What is 37+45?", chat=True, corrupt="What is 12+61?", config=ExplainConfig(**FAST))
    P, G = len(r["prompt_tokens"]), len(r["generated_tokens"])
    assert r["prompt_tokens"][-2:] == ["<think>", "\n"] and r["generated_tokens"][0] == "7"  # copies 37's ones digit
    for m in ("rollout", "flow", "grad_x_attention", "integrated_gradients"):
        assert len(r["attributions"][m]) == G and all(len(row) == P for row in r["attributions"][m])
    assert len(r["paths"]) == G and r["paths"][0][0]["positions"][0] < P
    assert len(r["expert_routes"]) == P + G and len(r["expert_routes"][0]) == 5  # nano: 5 MoE layers of 6
    assert len(r["ablation"]["heads"]) == 24 and len(r["ablation"]["experts"]) == 40
    assert r["patching"]["clean_token"] == "7" and r["patching"]["corrupted_token"] == "2"
    json.dumps({k: v for k, v in r.items() if k != "patterns"})
    with pytest.raises(TargetError, match="empty"):
        target_ids(nano, "")
    with pytest.raises(TargetError, match=r"after 'import o'.*' os'"):
        target_ids(nano, "s", "import o")
    assert target_ids(nano, "7+1", "What is 3") == nano.tokenizer.encode("7+1")
    with pytest.raises(QuadraticLimitError, match="limit of 8"):
        explain(nano, "What is 37+45?", chat=True, config=ExplainConfig(**FAST, max_quadratic_tokens=8))


def test_cli_explain_qwen2(tmp_path):
    """`r1kit explain` end to end on the bundled Qwen2 model (GQA, dense) with --chat and --target: PNGs and a
    report.html without external references; a target split differently across the boundary exits 2. (nano, the
    DeepSeek-V3-shaped model, goes through explain() above.)"""
    from r1kit.__main__ import main

    common = ["--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "3", "--methods", "rollout"]
    out = tmp_path / "q"
    assert main(["explain", "r1kit/nano-distill-qwen2", "--prompt", "What is 2+3?", "--chat", "--target", "2",
                 *common, "--out", str(out), "--json", str(tmp_path / "q.json")]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["generated_tokens"] == ["2"] and result["expert_routes"][0] == []
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "src=\"data:image/png;base64," in page
    assert (out / "attention_layer3.png").is_file() and (out / "ablation.png").is_file()
    assert not (out / "expert_routes.png").exists()  # dense model
    assert main(["explain", "r1kit/nano-distill-qwen2", "--prompt", "import o", "--target", "s", *common]) == 2
