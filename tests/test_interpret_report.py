"""The explain report.html in a real headless browser (the chat page test's chromium fixture): hovering a generated
token colours the prompt by its attribution row and names its top sources; nothing is fetched from anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1kit.interpret.report import write_html

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402
from test_web_page import browser  # noqa: E402, F401  (the chromium fixture)

RESULT = {"prompt": "What is 3+4?", "prompt_tokens": ["What", " is", " 3", "+", "4", "?"],
          "generated_tokens": ["3", "+", "4", "=", "7"],
          "attributions": {"rollout": [[0.1, 0.0, 0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
                                       [0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
                                       [0.0, 0.05, 0.5, 0.0, 0.4, 0.05]],
                           "integrated_gradients": [[0.0] * 6, [0.0] * 6, [0.0] * 6, [0.0] * 6,
                                                    [-1.0, 0.0, 0.0, 0.0, 0.0, 2.0]]}}


def test_hover_shows_sources_offline(browser, tmp_path: Path):  # noqa: F811
    page = write_html(RESULT, [], tmp_path / "report.html")
    browser.get(page.as_uri())
    generated = browser.find_elements(By.CSS_SELECTOR, "#generated .tok")
    assert [g.text for g in generated] == ["3", "+", "4", "=", "7"]
    ActionChains(browser).move_to_element(generated[4]).perform()
    sources = browser.find_element(By.ID, "sources").text
    assert sources == 'sources of "7" (rollout): " 3", "4", " is"'
    prompt = browser.find_elements(By.CSS_SELECTOR, "#prompt .tok")
    alpha = [float(p.value_of_css_property("background-color").rstrip(")").split(",")[-1] or 0)
             if "rgba" in p.value_of_css_property("background-color") else 1.0 for p in prompt]
    assert alpha[2] == 1.0 and abs(alpha[4] - 0.8) < 1e-3 and alpha[0] == 0.0  # row / its max
    Select(browser.find_element(By.ID, "method")).select_by_value("integrated_gradients")
    assert browser.find_element(By.ID, "sources").text.startswith('sources of "7" (integrated_gradients): "?"')
    assert "rgba(40, 80, 220" in prompt[0].value_of_css_property("background-color")  # negative: blue
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
