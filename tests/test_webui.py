"""The built-in chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against a real `edge-llm serve` process serving the bundled model as demo-a and demo-b."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
from server_process import ServerProcess, metric_value, write_models_toml

pytestmark = [pytest.mark.model, pytest.mark.slow]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def wait_for(predicate, timeout=60.0, what="condition"):
    """Poll until `predicate()` is truthy (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_path):
    tmp = tmp_path_factory.mktemp("webui")
    config = write_models_toml(tmp / "models.toml", {"demo-a": demo_path, "demo-b": demo_path})
    with ServerProcess(["--config", str(config), "-np", "2", "-c", "2048", "--keep-alive", "-1"],
                       tmp / "serve.log") as proc:
        yield proc.wait_healthy()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url + "/")
    wait_for(lambda: len(options_of(browser, "model")) == 2, 30, "the model list")
    yield browser
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"errors in the page's console: {severe}"


def options_of(driver, select_id):
    return driver.execute_script(f"return [...document.getElementById('{select_id}').options].map(o => o.value)")


def set_value(driver, element_id, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'));", element_id, value)


def assistant_messages(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant')].map(m => ({state: m.dataset.state, "
        "model: m.querySelector('.meta').textContent, text: m.querySelector('.text').textContent}))")


def record_text_lengths(driver):
    """Record every length the last answer's text takes while it streams (a MutationObserver)."""
    driver.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
            const texts = document.querySelectorAll('.msg.assistant .text');
            if (texts.length) window.__lengths.push(texts[texts.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)


def send(driver, text):
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()


def scrape(server):
    return httpx.get(server.url + "/metrics", timeout=10).text


def test_page_is_served_without_cdn_and_post_root_still_works(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in ("/ui", "/ui/app.js", "/ui/style.css"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    demo = httpx.post(server.url + "/", json={"prompt": "Hi", "max_length": 200}, timeout=120)
    assert demo.status_code == 200 and demo.json()["status"] == 200  # the FastAPI-demo API is untouched


def test_send_streams_the_answer_and_keeps_the_conversation(page, server):
    set_value(page, "max-tokens", "40")
    set_value(page, "temperature", "0")
    set_value(page, "extra", json.dumps({"ignore_eos": True}))
    set_value(page, "system", "You are a terse assistant.")
    record_text_lengths(page)
    send(page, "Name three colors.")
    wait_for(lambda: assistant_messages(page) and assistant_messages(page)[-1]["state"] == "done", 120, "the answer")
    answer = assistant_messages(page)[-1]
    assert answer["text"].strip() and answer["model"] == "demo-a"
    lengths = [n for n in page.execute_script("return window.__lengths") if 0 < n < len(answer["text"])]
    assert len(set(lengths)) >= 3, f"the text did not grow piece by piece: {lengths}"
    # The answer equals the API's own greedy answer with the same system prompt and settings.
    same = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "demo-a", "max_tokens": 40, "temperature": 0, "top_p": 0.95, "ignore_eos": True,
        "messages": [{"role": "system", "content": "You are a terse assistant."},
                     {"role": "user", "content": "Name three colors."}]}).json()
    assert answer["text"] == same["choices"][0]["message"]["content"]
    # The conversation survives a reload (localStorage).
    page.refresh()
    wait_for(lambda: len(assistant_messages(page)) == 1, 30, "the restored conversation")
    assert assistant_messages(page)[0]["text"] == answer["text"]
    assert page.execute_script("return document.querySelector('.msg.user .text').textContent") == "Name three colors."


def test_stop_cuts_the_answer_and_frees_the_slot(page, server):
    set_value(page, "max-tokens", "900")
    set_value(page, "extra", json.dumps({"ignore_eos": True}))
    send(page, "Tell me a very long story about a dragon.")
    wait_for(lambda: len(assistant_messages(page)[-1]["text"]) > 20, 120, "the first streamed words")
    wait_for(lambda: metric_value(scrape(server), "edge_llm:num_requests_running", model_name="demo-a") == 1,
             30, "the request to be running")
    page.find_element("id", "stop").click()
    wait_for(lambda: assistant_messages(page)[-1]["state"] == "stopped", 10, "the stopped state")
    stopped = assistant_messages(page)[-1]["text"]
    # The abort reached the server: the slot is free again, well before 900 tokens could be generated.
    wait_for(lambda: metric_value(scrape(server), "edge_llm:num_requests_running", model_name="demo-a") == 0,
             30, "the server to free the slot")
    assert metric_value(scrape(server), "edge_llm:request_success_total", model_name="demo-a",
                        finished_reason="cancelled") >= 1
    assert assistant_messages(page)[-1]["text"] == stopped  # nothing more arrived after Stop
    assert page.find_element("id", "send").is_enabled() and not page.find_element("id", "stop").is_enabled()


def test_switching_model_sends_to_the_other_model(page, server):
    before = metric_value(scrape(server), "edge_llm:request_success_total", model_name="demo-b",
                          finished_reason="length") or 0.0
    set_value(page, "model", "demo-b")
    set_value(page, "max-tokens", "5")
    set_value(page, "extra", json.dumps({"ignore_eos": True}))
    send(page, "Hello!")
    wait_for(lambda: assistant_messages(page) and assistant_messages(page)[-1]["state"] == "done", 120, "the answer")
    assert assistant_messages(page)[-1]["model"] == "demo-b"
    after = metric_value(scrape(server), "edge_llm:request_success_total", model_name="demo-b",
                         finished_reason="length")
    assert after == before + 1
    page.refresh()  # the chosen model is remembered
    wait_for(lambda: page.execute_script("return document.getElementById('model').value") == "demo-b", 30,
             "the remembered model")


def test_api_key_pasted_into_the_page(browser, tmp_path, demo_path):
    config = write_models_toml(tmp_path / "models.toml", {"keyed": demo_path})
    with ServerProcess(["--config", str(config), "-np", "1", "-c", "512", "--api-key", "s3cret"],
                       tmp_path / "serve.log") as proc:
        proc.wait_healthy()
        browser.get(proc.url + "/ui")  # the page itself needs no key
        wait_for(lambda: "API key" in browser.find_element("id", "status").text, 30, "the key prompt")
        assert options_of(browser, "model") == []
        set_value(browser, "api-key", "s3cret")
        wait_for(lambda: options_of(browser, "model") == ["keyed"], 30, "the model list with the key")
        set_value(browser, "max-tokens", "3")
        send(browser, "Hi")
        wait_for(lambda: assistant_messages(browser) and assistant_messages(browser)[-1]["state"] == "done", 120,
                 "the answer")
        assert assistant_messages(browser)[-1]["text"]
        browser.execute_script("localStorage.clear()")
