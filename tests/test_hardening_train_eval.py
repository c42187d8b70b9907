"""Bad recipes and eval arguments as real `r1kit` subprocesses (one line naming the file / field, exit code 2, no
traceback), the same checks in the library functions, and the one perplexity definition against hand computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error

from r1kit.eval import EvalError, perplexity, perplexity_windows
from r1kit.train.config import TrainConfig, TrainConfigError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def r1kit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1kit", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=REPO)


def run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:  # two cores
        return list(pool.map(lambda args: r1kit(*args), commands))




# ---------------------------------------------------------------------------------------------------- recipes


RECIPES = {  # file content -> words the error must contain; the first three run as `r1kit train`
    "": ["empty"],
    "- seq_len: 64\n": ["mapping", "list"],
    "lerning_rate: 0.1\n": ["lerning_rate"],
    "# only a comment\n": ["empty"],
    "{}\n": ["empty"],
    "42\n": ["mapping", "int"],
    "batch_size: eight\n": ["batch_size", "eight"],
    "data: [stdlib]\n": ["data", "mapping"],
    "model: {preset: tiny-moe, overrides: {hidden_size: '64'}}\n": ["hidden_size"],
    "threads: 0\n": ["threads"],
    "data: {tokenizer_vocab: 0}\n": ["data.tokenizer_vocab"],
    "1: 2\nlerning_rate: 0.1\n": ["'1'", "lerning_rate"],
}


def test_bad_recipes_are_one_line_errors_naming_the_file_and_key(tmp_path):
    files = []
    for i, text in enumerate(RECIPES):
        files.append(tmp_path / f"recipe{i}.yaml")
        files[-1].write_text(text)
    commands = [["train", "--config", str(f), "--out-dir", str(tmp_path / f"run{i}"), "--max-steps", "1"]
                for i, f in enumerate(files)]
    for proc, file, words in zip(run_all(commands[:3]), files, RECIPES.values(), strict=False):
        assert_one_line_error(proc, file.name, *words)
    for file, words in zip(files[3:], list(RECIPES.values())[3:], strict=True):  # the same check, in-process
        with pytest.raises(TrainConfigError) as e:
            TrainConfig.from_yaml(file)
        assert all(w in str(e.value) for w in [file.name, *words]), e.value
    assert not any((tmp_path / f"run{i}").exists() for i in range(len(files)))  # refused before any run started


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seq_len: 64 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(TrainConfigError, match=r"latin1\.yaml: not a text file"):
        TrainConfig.from_yaml(bad)


# ---------------------------------------------------------------------------------------------------- eval


def test_bad_eval_arguments_are_one_line_errors():
    cases = [(["--task", "arithmetic", "--n", "0"], ["n = 0", ">= 1"]),
             (["--task", "arithmetic", "--n", "-3"], ["n = -3"]),
             (["--task", "arithmetic", "--kinds", "add2,div2"], ["div2", "add2"]),
             (["--task", "perplexity", "--max-tokens", "0"], ["max_tokens = 0"])]  # the rest: in-process below
    procs = run_all([["eval", "r1kit/nano", "--device", "cpu", *flags] for flags, _ in cases])
    for proc, (flags, words) in zip(procs, cases, strict=True):
        assert_one_line_error(proc, *words)
        assert "%" not in proc.stdout, (flags, proc.stdout)  # no accuracy table printed


def test_eval_functions_refuse_bad_arguments(make_model):
    from r1kit import R1Model
    from r1kit.eval import eval_arithmetic, eval_perplexity

    nano = R1Model.from_pretrained("r1kit/nano", device="cpu")
    for kwargs, field in [({"n": 0}, "n = 0"), ({"n": -3}, "n = -3"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"batch_size": 0}, "batch_size"), ({"kinds": ["add2", "nope"]}, "nope"),
                          ({"kinds": []}, "kinds"), ({"kinds": [""]}, "kinds"), ({"kinds": ["add2", "add2"]}, "twice")]:
        with pytest.raises(EvalError, match=field):
            eval_arithmetic(nano, **{"kinds": ["add2"], **kwargs}, progress=False)
    for max_tokens in (0, -5):
        with pytest.raises(EvalError, match=f"max_tokens = {max_tokens}"):
            eval_perplexity(nano, ["x = 1\n"], max_tokens=max_tokens)
    model = make_model("tiny-dense")
    ids = list(range(20))
    for kwargs, field in [({"window": 0}, "window"), ({"stride": 0}, "stride"), ({"window": 4, "stride": 5}, "stride"),
                          ({"max_tokens": 0}, "max_tokens"), ({"window": 10**6}, "context")]:
        with pytest.raises(EvalError, match=field):
            perplexity(model, ids, **kwargs)
    with pytest.raises(EvalError, match="at least 2 tokens"):
        perplexity(model, [3])


# ---------------------------------------------------------------------------------------------------- perplexity


def naive_nll(model, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of ids[1:], the whole sequence in one forward: no windows."""
    x = torch.tensor([ids])
    return F.cross_entropy(model(x[:, :-1])[0].float(), x[0, 1:], reduction="none")


@torch.no_grad()
def test_perplexity_is_full_sequence_cross_entropy_when_the_text_fits_a_window(make_model):
    model = make_model("tiny-moe")
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    want = naive_nll(model, ids)
    for stride in (None, 7, 1):  # overlapping windows that all start at 0 score each token once, all context
        got = perplexity(model, ids, window=64, stride=stride)
        assert got["tokens"] == 39
        assert got["perplexity"] == pytest.approx(math.exp(float(want.mean())), rel=1e-4)


@torch.no_grad()
def test_perplexity_windows_are_independent_contexts(make_model):
    model = make_model("tiny-moe")
    ids = torch.randint(0, model.config.vocab_size, (33,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks = [ids[0:9], ids[8:17], ids[16:25], ids[24:33]]  # window 8: each block's inputs see nothing before it
    want = torch.cat([naive_nll(model, b) for b in blocks])
    got = perplexity(model, ids, window=8)
    assert got["tokens"] == 32 and got["windows"] == 4
    assert got["nll_per_token"] == pytest.approx(float(want.mean()), rel=1e-4)
    # stride 4: every token after the first 8 is scored with at least 4 tokens of context
    got = perplexity(model, ids, window=8, stride=4)
    tail = [float(naive_nll(model, ids[e - 9:e])[-4:].sum()) for e in (13, 17, 21, 25, 29, 33)]
    first = float(naive_nll(model, ids[:9]).sum())  # chunks 1-4 and 5-8 see everything before them
    assert got["tokens"] == 32
    assert got["nll_per_token"] == pytest.approx((first + sum(tail)) / 32, rel=1e-4)


def test_a_token_budget_samples_windows_across_the_whole_text():
    spans = perplexity_windows(100_001, 256, 256, max_tokens=2_560)
    assert sum(scored for _, _, scored in spans) <= 2_560 and len(spans) == 10
    ends = [end for _, end, _ in spans]
    assert ends[0] == 257 and ends[-1] > 90_000  # not the first 2,560 tokens: spread over all 100,000
    gaps = {b - a for a, b in pairwise(ends)}
    assert max(gaps) - min(gaps) <= 256  # evenly spaced
    assert perplexity_windows(1_001, 256, 256, max_tokens=5_000) == perplexity_windows(1_001, 256, 256)


def test_cli_perplexity_is_the_library_definition(tmp_path):
    from r1kit import R1Model
    from r1kit.eval import eval_perplexity

    out = tmp_path / "ppl.json"
    proc = r1kit("eval", "r1kit/nano", "--device", "cpu", "--dtype", "fp32", "--task", "perplexity",
                 "--max-tokens", "512", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(out.read_text())
    lib = eval_perplexity(R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32"), max_tokens=512)
    assert cli["tokens"] == lib["tokens"] == 512 and cli["of_tokens"] == lib["of_tokens"] > 100_000
    assert cli["perplexity"] == pytest.approx(lib["perplexity"], rel=1e-5)
