"""HumanEval (r1kit.eval.humaneval): the canonical solutions pass 164/164 and `return None` 0/164 in the sandbox,
pass@k against brute force, sample files, and the three forms of `r1kit eval --task humaneval` as real
subprocesses (a model, a real r1kit server over both APIs, a sample file)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from r1kit.eval import EvalError, sandbox
from r1kit.eval.humaneval import (
    chat_completion,
    eval_humaneval,
    load_problems,
    pass_at_k,
    program,
    read_samples,
    summarize,
    truncate,
    write_samples,
)
from r1kit.eval.sandbox import SandboxError, isolation


def _sandbox_or_skip() -> None:
    try:
        isolation()
    except SandboxError as e:
        if os.environ.get("R1KIT_REQUIRE_SANDBOX") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def problems() -> dict:
    return load_problems()


def r1kit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1kit", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


# ---------------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):  # the share of k-subsets of the n samples holding at least one pass
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    for n, c, k in ((200, 3, 100), (1000, 1, 1), (1000, 10, 500), (2000, 0, 10)):
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
    with pytest.raises(EvalError, match="k=11"):
        pass_at_k(10, 2, 11)


def test_summarize_per_problem_and_overall():
    results = [{"task_id": t, "passed": p, "result": ""} for t, p in
               [("a", True), ("a", False), ("a", False), ("b", False), ("b", False), ("b", False)]]
    res = summarize(results, [1, 2])
    assert res["problems"]["a"] == {"n": 3, "correct": 1, "pass@1": pytest.approx(1 / 3),
                                    "pass@2": pytest.approx(2 / 3)}
    assert res["pass@1"] == pytest.approx(1 / 6) and res["pass@2"] == pytest.approx(1 / 3)
    assert [k for k in summarize(results) if k.startswith("pass@")] == ["pass@1"]  # default: the k <= n
    with pytest.raises(EvalError, match="pass@10 needs at least 10 samples per problem"):
        summarize(results, [10])


# ---------------------------------------------------------------------------------------------------- programs


def test_truncate_and_chat_replies(problems):
    assert truncate("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate("    return 1\nprint(f(2))") == "    return 1"
    p = problems["HumanEval/0"]
    reply = "<think>easy</think>Here:\n```python\nfrom typing import List\n\ndef has_close_elements(x, t):\n" \
            "    return False\n```\nDone."
    assert chat_completion(reply, p) == "\nfrom typing import List\n\ndef has_close_elements(x, t):\n    return False\n"
    assert chat_completion("```\n    return False\n```", p) == "    return False\n"
    assert program(p, "    return 1\n").endswith("check(has_close_elements)\n")


def test_canonical_solutions_pass_and_return_none_fails(problems):
    _sandbox_or_skip()
    canonical = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    res = eval_humaneval(canonical, problems, workers=2)
    assert len(problems) == 164 and res["pass@1"] == 1.0, [r for r in res["results"] if not r["passed"]][:3]
    wrong = eval_humaneval([{"task_id": t, "completion": "    return None\n"} for t in problems], problems, workers=2)
    assert wrong["pass@1"] == 0.0 and sum(r["passed"] for r in wrong["results"]) == 0
    assert all(r["result"] for r in wrong["results"])  # each says why


def test_sample_file_errors_name_the_line(problems, tmp_path):
    bad = tmp_path / "s.jsonl"
    for text, words in [('{"task_id": "HumanEval/0", "completion": "x"}\n{oops\n', "s.jsonl:2: not JSON"),
                        ('{"task_id": "HumanEval/0"}\n', "s.jsonl:1: needs string fields task_id and completion"),
                        ('{"task_id": "HumanEval/999", "completion": ""}\n', "'HumanEval/999' is not a HumanEval"),
                        ("\n", "no samples")]:
        bad.write_text(text)
        with pytest.raises(EvalError, match=words):
            read_samples(bad, problems)


def test_no_sandbox_is_refused_with_the_reason(monkeypatch, problems):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.isolation.cache_clear()
    try:
        with pytest.raises(SandboxError, match="bwrap: not installed; unshare: not installed.*install_sandbox.sh"):
            eval_humaneval([{"task_id": "HumanEval/0", "completion": "    return True\n"}], problems)
    finally:
        sandbox.isolation.cache_clear()


# ---------------------------------------------------------------------------------------------------- the CLI


def test_cli_scores_a_sample_file(problems, tmp_path):
    _sandbox_or_skip()
    tasks = list(problems)[:2]
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in tasks]
    samples += [{"task_id": t, "completion": "    while True: pass\n"} for t in tasks]
    write_samples(samples, tmp_path / "samples.jsonl")
    out = r1kit("eval", "--task", "humaneval", "--completions", "samples.jsonl", "--k", "1,2", "--timeout", "2",
                "--json", "res.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["pass@1"] == 0.5 and res["pass@2"] == 1.0
    expected = [(t, True) for t in tasks] + [(t, False) for t in tasks]
    assert [(r["task_id"], r["passed"]) for r in res["results"]] == expected
    assert res["results"][2]["result"].startswith(("timed out", "killed"))
    assert "pass@1 50.0% pass@2 100.0% on 2 problems" in out.stdout


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"task_id": "HumanEval/0"}\n')
    cases = [(["--completions", "bad.jsonl"], "bad.jsonl:1: needs string fields"),
             ([], "exactly one of MODEL, --base-url or --completions, got none"),
             (["--base-url", "http://127.0.0.1:9/v1"], "--base-url needs --model"),
             (["--completions", "missing.jsonl"], "missing.jsonl: no such samples file"),
             (["--completions", "bad.jsonl", "--k", "x"], "--k 'x': not an integer")]
    procs = [subprocess.Popen([sys.executable, "-m", "r1kit", "eval", "--task", "humaneval", *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for proc, (_, words) in zip(procs, cases, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and words in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_cli_generates_with_an_r1kit_model(tmp_path):
    _sandbox_or_skip()
    out = r1kit("eval", "r1kit/nano", "--task", "humaneval", "--limit", "2", "--n", "2", "--max-new-tokens", "8",
                "--k", "1,2", "--device", "cpu", "--json", "res.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert [r["task_id"] for r in res["results"]] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert set(res["problems"]) == {"HumanEval/0", "HumanEval/1"} and "pass@1" in res and "pass@2" in res
    assert all(isinstance(r["completion"], str) and r["result"] for r in res["results"])


def test_cli_against_a_real_r1kit_server(tmp_path):
    _sandbox_or_skip()
    from r1kit.api import R1Model
    from r1kit.serve.engine_service import EngineService
    from r1kit.serve.openai_api import running_server

    service = EngineService(R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32"))
    service.start()
    try:
        with running_server(service, api_key="k3y") as base:
            for api in ("completions", "chat"):
                out = r1kit("eval", "--task", "humaneval", "--base-url", f"{base}/v1", "--model", "r1kit/nano",
                            "--api-key", "k3y", "--api", api, "--limit", "2", "--n", "2", "--max-new-tokens", "8",
                            "--k", "1,2", "--json", f"{api}.json", cwd=tmp_path)
                assert out.returncode == 0, out.stderr
                res = json.loads((tmp_path / f"{api}.json").read_text())
                assert len(res["results"]) == 4 and "pass@2" in res
                assert not any("<think>" in r["completion"] for r in res["results"])
            out = r1kit("eval", "--task", "humaneval", "--base-url", f"{base}/v1", "--model", "r1kit/nano",
                        "--api-key", "wrong", "--limit", "1", "--n", "1", cwd=tmp_path)
            assert out.returncode == 2 and "AuthenticationError" in out.stderr and "Traceback" not in out.stderr
    finally:
        service.shutdown(drain=False)
