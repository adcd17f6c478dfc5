"""The web page at /, in a real browser (Debian's chromium and chromedriver, driven by selenium; no browser
download) against a real Ray Serve replica: what it shows must be what the API answers. Screenshots (desktop and
phone width) go to $NMT_TEST_OUTPUT, by default test-output/ at the repository's root."""

import math
import os
import shutil
from pathlib import Path

import pytest
import requests

from conftest import ROOT, free_port

TEXT = "The file could not be opened. Click the button to save the document."
OUTPUT = Path(os.environ.get("NMT_TEST_OUTPUT", ROOT / "test-output"))


@pytest.fixture(scope="module")
def served(artifact):
    import ray
    from ray import serve

    from service.app import TranslatorDeployment

    http_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(TranslatorDeployment.bind({"artifact_dir": str(artifact), "model_id": "en-de", "device": "cpu"}),
              name="translation", route_prefix="/")
    yield f"http://127.0.0.1:{http_port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "scripts/install_test_tools.sh installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_window_size(1280, 1000)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait(driver, condition, timeout_s=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s).until(lambda d: condition(d))


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def all_of(node, css):
    from selenium.webdriver.common.by import By

    return node.find_elements(By.CSS_SELECTOR, css)


def open_and_translate(driver, url, text, beam_size=4, n_best=1, format="text"):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver.get(url + "/")
    wait(driver, lambda d: all_of(d, "#model option"))  # the models came from /v1/models
    source = by_id(driver, "source")
    source.clear()
    source.send_keys(text)
    for element_id, value in (("beam-size", beam_size), ("n-best", n_best)):
        field = by_id(driver, element_id)
        field.clear()
        field.send_keys(str(value))
    Select(by_id(driver, "format")).select_by_value(format)
    source.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut, not the button


def api_translation(url, text, beam_size=4):
    r = requests.post(url + "/translate", json={"text": text, "model": "en-de", "beam_size": beam_size,
                                                "return_attention": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["translations"][0]


def test_page_translates_and_lights_up_the_source_words_each_target_word_attends_to(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_and_translate(browser, served, TEXT)
    wait(browser, lambda d: by_id(d, "translation").text.strip())
    expected = api_translation(served, TEXT)
    assert by_id(browser, "translation").text == expected["text"]
    sentences = all_of(browser, "#sentences .sentence")
    assert len(sentences) == len(expected["attention"]) == 2
    attention = expected["attention"][0]
    source_spans = all_of(sentences[0], ".source .tok")
    target_spans = all_of(sentences[0], ".target .tok")
    assert [s.text for s in source_spans] == attention["source_tokens"]
    assert [t.text for t in target_spans] == attention["target_tokens"]
    for k, target in enumerate(target_spans):
        ActionChains(browser).move_to_element(target).perform()
        shown = [float(s.get_attribute("data-weight")) for s in source_spans]
        assert shown == pytest.approx(attention["weights"][k], abs=1e-9), k
        strongest = [i for i, s in enumerate(source_spans) if "strongest" in s.get_attribute("class")]
        assert strongest == [max(range(len(shown)), key=shown.__getitem__)]
    # The heatmap: a row per target token, a column per source token, the API's weights in its cells.
    all_of(sentences[0], "details.heatmap summary")[0].click()
    rows = all_of(sentences[0], "details.heatmap tr")[1:]
    assert len(rows) == len(attention["target_tokens"])
    cells = [[float(c.get_attribute("data-weight")) for c in all_of(row, "td")] for row in rows]
    assert all(len(r) == len(attention["source_tokens"]) for r in cells)
    assert cells == [pytest.approx(w, abs=1e-9) for w in attention["weights"]]
    # By keyboard: Tab from the translation's text reaches the first target word, and the next Tab the second.
    ActionChains(browser).move_to_element(by_id(browser, "translation")).click().perform()
    for k in (0, 1):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        active = browser.switch_to.active_element
        assert active == target_spans[k] and "active" in active.get_attribute("class")
        shown = [float(s.get_attribute("data-weight")) for s in source_spans]
        assert shown == pytest.approx(attention["weights"][k], abs=1e-9)
    ActionChains(browser).move_to_element(target_spans[0]).perform()
    browser.save_screenshot(str(OUTPUT / "page-desktop.png"))


def test_explain_view_draws_every_layer_and_head_as_the_api_gives_them(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    open_and_translate(browser, served, TEXT)
    wait(browser, lambda d: all_of(d, "#sentences .sentence"))
    attention = api_translation(served, TEXT)["attention"][0]
    all_of(browser, "#sentences .sentence .explain-button")[0].click()
    wait(browser, lambda d: by_id(d, "explain").is_displayed() and all_of(d, "#explain-view line"))
    source = "".join(attention["source_tokens"][:-1]).replace("▁", " ").strip()
    target = "".join(attention["target_tokens"]).replace("▁", " ").strip()
    r = requests.post(served + "/v1/explain", json={"text": source, "target": target, "model": "en-de"}, timeout=60)
    assert r.status_code == 200, r.text
    explained = r.json()
    assert explained["decoder_input_tokens"][1:] == attention["target_tokens"]  # the page explained its own output
    layers, heads = len(explained["cross_attention"]), len(explained["cross_attention"][0])
    view = by_id(browser, "explain-view")
    for kind, queries in (("cross_attention", "decoder_input_tokens"), ("encoder_self_attention", "source_tokens"),
                          ("decoder_self_attention", "decoder_input_tokens")):
        Select(by_id(browser, "explain-kind")).select_by_value(kind)
        Select(by_id(browser, "explain-layer")).select_by_value(str(layers - 1))
        Select(by_id(browser, "explain-head")).select_by_value("1")
        weights = explained[kind][layers - 1][1]
        drawn = {(int(line.get_attribute("data-from")), int(line.get_attribute("data-to"))):
                 float(line.get_attribute("data-weight")) for line in all_of(view, "line")}
        expected = {(i, j): w for i, row in enumerate(weights) for j, w in enumerate(row) if w >= 0.01}
        assert drawn.keys() == expected.keys(), kind
        assert all(math.isclose(drawn[k], expected[k], abs_tol=1e-9) for k in drawn), kind
        if kind == "decoder_self_attention":  # masked: nothing drawn to a later position
            assert all(j <= i for i, j in drawn)
        labels = all_of(view, "text.query")
        assert [t.text for t in labels] == explained[queries]
        ActionChains(browser).move_to_element(labels[1]).perform()
        visible = {int(line.get_attribute("data-from")) for line in all_of(view, "line") if line.is_displayed()}
        assert visible == {1}, kind
    Select(by_id(browser, "explain-kind")).select_by_value("cross_attention")
    Select(by_id(browser, "explain-head")).select_by_value("all")
    lines = all_of(view, "line")
    assert {int(line.get_attribute("data-head")) for line in lines} == set(range(heads))
    assert len(lines) == sum(w >= 0.01 for h in range(heads)
                             for row in explained["cross_attention"][layers - 1][h] for w in row)
    browser.save_screenshot(str(OUTPUT / "page-explain.png"))


def test_errors_show_the_service_message_and_n_best_shows_scores(served, browser):
    open_and_translate(browser, served, TEXT, beam_size=2, n_best=3)
    wait(browser, lambda d: by_id(d, "error").is_displayed())
    message = by_id(browser, "error").text
    assert message.startswith("422:") and "n_best" in message, message
    open_and_translate(browser, served, "Select the cell.", beam_size=4, n_best=3)
    wait(browser, lambda d: by_id(d, "n-best-block").is_displayed())
    assert not by_id(browser, "error").is_displayed()
    r = requests.post(served + "/translate", json={"text": "Select the cell.", "model": "en-de", "beam_size": 4,
                                                   "n_best": 3, "return_scores": True}, timeout=60)
    items = [li.text for li in all_of(browser, "#n-best-list li")]
    assert items == [f"{h['text']} (score {h['score']:.3f})" for h in r.json()["translations"][0]["n_best"]]


def test_markup_is_shown_as_text_with_its_tags(served, browser):
    source = 'Press <b>Ctrl+S</b> to save the <img src=x onerror="document.title=1">file.'
    open_and_translate(browser, served, source, format="html")
    wait(browser, lambda d: by_id(d, "translation").text.strip())
    r = requests.post(served + "/translate", json={"text": source, "model": "en-de", "beam_size": 4,
                                                   "format": "html"}, timeout=60)
    assert by_id(browser, "translation").text == r.json()["translations"][0]["text"]
    assert not all_of(browser, "#translation *") and browser.title != "1"  # shown as text, never as markup


def test_phone_width_labels_and_no_horizontal_scroll(served, browser):
    browser.set_window_size(390, 844)
    try:
        open_and_translate(browser, served, TEXT)
        wait(browser, lambda d: all_of(d, "#sentences .sentence"))
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('input, select, textarea, button')]"
            ".filter(e => !(e.labels && e.labels.length) && !e.textContent.trim() && !e.getAttribute('aria-label'))"
            ".map(e => e.id)")
        assert unlabelled == []
        browser.save_screenshot(str(OUTPUT / "page-phone.png"))
    finally:
        browser.set_window_size(1280, 1000)


def test_page_and_its_files_carry_a_csp_that_allows_only_its_own_origin(served):
    for path in ("/", "/static/page.js", "/static/page.css"):
        r = requests.get(served + path, timeout=10)
        assert r.status_code == 200, path
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
    r = requests.get(served + "/static/../app.py", timeout=10)
    assert r.status_code == 404
    assert requests.get(served + "/static/index.html", timeout=10).status_code == 404  # only the fixed table
