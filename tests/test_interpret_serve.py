"""POST /v1/explain of `r1kit serve` and the chat page's Explain view (real headless chromium via Selenium), on
one module-scoped server with an API key; the reference is r1kit.interpret.explain called directly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from http_helpers import request_json, serve

from r1kit.api import R1Model
from r1kit.interpret import ExplainConfig, explain, to_json
from r1kit.interpret.explain import prompt_ids

try:  # the chromium fixture and helpers of the chat page's tests (skipped there without selenium)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_web_page import ask, browser, last_answer, set_field  # noqa: F401  (browser: the fixture)
except (ImportError, pytest.skip.Exception):
    @pytest.fixture
    def browser():
        pytest.skip("needs selenium (the dev extra)")

KEY = "explain-key"
PROMPT = "What is 4+5?"
KEYS = {"object", "model", "prompt", "prompt_tokens", "generated_tokens", "target_given", "chat", "attributions",
        "paths", "expert_routes", "ablation", "patching", "counterfactuals", "config"}


@pytest.fixture(scope="module")
def model() -> R1Model:
    return R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def base_url(model) -> Iterator[str]:
    with serve(model, api_key=KEY) as (url, _):
        yield url


def post(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    return request_json(url, "/v1/explain", body, key=key, timeout=60)


def test_explain_endpoint_matches_explain_and_refuses_bad_requests(model, base_url):
    config = {"methods": ["rollout", "grad_x_attention"], "max_new_tokens": 6}
    status, got = post(base_url, {"prompt": PROMPT, "config": config})
    assert status == 200 and set(got) == KEYS and got["object"] == "explanation"
    ref = to_json(explain(model, PROMPT, chat=True, config=ExplainConfig.from_dict(config)))
    assert got["prompt_tokens"] == ref["prompt_tokens"] and got["generated_tokens"] == ref["generated_tokens"]
    for method in ("rollout", "rollout_chained", "grad_x_attention"):
        torch.testing.assert_close(torch.tensor(got["attributions"][method]),
                                   torch.tensor(ref["attributions"][method]), atol=1e-5, rtol=0)
    assert len(got["attributions"]["rollout"]) == len(got["generated_tokens"])  # (G, P)
    assert len(got["attributions"]["rollout"][0]) == len(got["prompt_tokens"])

    assert post(base_url, {"prompt": PROMPT}, key=None)[0] == 401
    assert post(base_url, {"prompt": PROMPT}, key="wrong")[0] == 401
    for body, named in (({"prompt": PROMPT, "colour": 1}, "colour"), ({"prompt": 3}, "prompt"),
                        ({"prompt": PROMPT, "config": {"methods": ["bogus"]}}, "bogus"),
                        ({"prompt": PROMPT, "config": {"ig_stepz": 2}}, "ig_stepz"),
                        ({"prompt": PROMPT, "target": ""}, "target")):
        status, err = post(base_url, body)
        assert status == 400 and named in err["error"]["message"], (body, err)


def test_chat_page_explain_view_colours_prompt_tokens(model, base_url, browser):
    browser.get(base_url + "/")
    set_field(browser, "api-key", KEY)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "8")
    ask(browser, PROMPT)
    reply = last_answer(browser, "done")
    reply.find_element(By.CSS_SELECTOR, ".explain-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".explain-prompt .tok"))
    shown = [e.get_attribute("textContent") for e in reply.find_elements(By.CSS_SELECTOR, ".explain-prompt .tok")]
    ref = [model.tokenizer.decode([i]) for i in prompt_ids(model, PROMPT, chat=True)]
    assert shown == ref  # tokens as text: "<｜User｜>" is not parsed as HTML
    chips = reply.find_elements(By.CSS_SELECTOR, ".explain-generated .gen")
    assert chips and "chosen" in chips[0].get_attribute("class")

    def colours() -> list[str]:
        return [e.value_of_css_property("background-color")
                for e in reply.find_elements(By.CSS_SELECTOR, ".explain-prompt .tok")]

    first = colours()
    assert len(set(first)) > 2  # coloured by attribution, not uniformly
    chips[-1].click()
    assert "chosen" in chips[-1].get_attribute("class") and "chosen" not in chips[0].get_attribute("class")
    assert colours() != first  # another generated token: another row of the attribution

    set_field(browser, "api-key", "wrong")  # the view's errors show in the reply, like the chat's
    reply.find_element(By.CSS_SELECTOR, ".explain-button").click()
    error = last_answer(browser, "error").find_element(By.CSS_SELECTOR, ".error")
    assert "explain: HTTP 401" in error.text
