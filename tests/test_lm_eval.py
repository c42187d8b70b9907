"""lm-evaluation-harness (from PyPI) against a real r1kit server: ``local-completions`` on a loglikelihood
(multiple-choice) task and ``local-chat-completions`` on a generation task, both defined from a local JSONL
(--include_path). The loglikelihoods lm-eval computes from the server's echoed prompt logprobs must equal a
log-softmax over a plain forward of the model (the independent reference). lm-eval's imports take most of the
time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from r1kit.api import R1Model  # noqa: E402
from r1kit.serve.engine_service import EngineService  # noqa: E402
from r1kit.serve.openai_api import running_server  # noqa: E402

DOCS = [{"question": "2+2=", "choices": ["4", "5", "9"], "label": 0},
        {"question": "3+4=", "choices": ["1", "7", "12"], "label": 1},
        {"question": "5+1=", "choices": ["8", "2", "6"], "label": 2}]


def write_tasks(folder: Path) -> None:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "r1kit_mc.yaml").write_text(
        "task: r1kit_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (folder / "r1kit_gen.yaml").write_text(
        "task: r1kit_gen\n" + common + "output_type: generate_until\ndoc_to_text: 'What is {{question}}'\n"
        "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


def test_lm_eval_local_completions_and_chat(tmp_path, monkeypatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path)
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    service = EngineService(model, max_num_seqs=4)
    service.start()
    try:
        with running_server(service) as base:
            tasks = TaskManager(include_path=str(tmp_path))
            common = f"model={service.model_name},num_concurrent=1,max_retries=1"
            mc = simple_evaluate(model="local-completions", tasks=["r1kit_mc"], task_manager=tasks, log_samples=True,
                                 model_args=f"base_url={base}/v1/completions,tokenizer={model.path},"
                                            f"tokenizer_backend=huggingface,{common}")
            gen = simple_evaluate(model="local-chat-completions", tasks=["r1kit_gen"], task_manager=tasks,
                                  apply_chat_template=True, log_samples=True,
                                  model_args=f"base_url={base}/v1/chat/completions,{common}")
    finally:
        service.shutdown(drain=False)
    assert 0 <= mc["results"]["r1kit_mc"]["acc,none"] <= 1
    tok = model.tokenizer
    for sample in mc["samples"]["r1kit_mc"]:  # each choice's loglikelihood, recomputed here from a plain forward
        for (ctx, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            context = tok.encode(ctx)
            ids = context + tok.encode(continuation)  # as lm-eval encodes a (context, continuation) pair
            with torch.no_grad():
                logp = torch.log_softmax(model.model(torch.tensor([ids]))[0].float(), dim=-1)
            expected = sum(logp[p - 1, ids[p]].item() for p in range(len(context), len(ids)))
            assert resp[0][0] == pytest.approx(expected, abs=1e-3)
    answers = [sample["resps"][0][0] for sample in gen["samples"]["r1kit_gen"]]
    assert len(answers) == len(DOCS) and all(isinstance(a, str) for a in answers)
    assert "exact_match,none" in gen["results"]["r1kit_gen"]
