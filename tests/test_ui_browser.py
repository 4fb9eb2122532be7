"""The web UI in a real browser (headless Chromium driven by Selenium): upload a subject, type a prompt, generate,
see the images, compare and explain; a prompt without the subject word shows the message. Slow (the toy model
generates for real); needs Debian's `chromium` and `chromium-driver`: `apt-get install chromium chromium-driver`, then
`python -m pytest -m slow tests/test_ui_browser.py`. With NA_UI_SCREENSHOT=FILE it saves the app, generated."""

import os
import shutil
import socket

import pytest

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    from nested_attention_toy.examples import FOLDER
    from nested_attention_ui.app import build_app, bundled_examples, launch
    from nested_attention_ui.session import UISession

    session = UISession("toy", ["toy-person", "toy-pet"])
    app = build_app(session, bundled_examples(FOLDER), toy=True, prompt="a photo of a person at the beach")
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_prompt_generate_and_a_missing_word(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from nested_attention_toy.examples import FOLDER

    wait = WebDriverWait(browser, 120)
    browser.get(app_url)
    prompt = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    status = browser.find_element(By.ID, "prompt-status")
    wait.until(lambda _: status.text.startswith("Ready"))
    browser.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(str(FOLDER / "person-a.png"))
    wait.until(lambda _: "person-a.png" in browser.page_source)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
    if os.environ.get("NA_UI_SCREENSHOT"):
        browser.save_screenshot(os.environ["NA_UI_SCREENSHOT"])
    for tab, button, result, count in (("Compare", "compare", "#compare-gallery img", 5),
                                       ("Explain", "explain", "#explain-sheet img", 1)):
        browser.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{tab}']").click()
        wait.until(ready.element_to_be_clickable((By.ID, button))).click()
        wait.until(lambda _, result=result, count=count: len(browser.find_elements(By.CSS_SELECTOR, result)) >= count)
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys("a photo of a dog at the beach")
    wait.until(lambda _: "does not contain the subject word 'person'" in status.text)
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Generate']").click()
    wait.until(ready.element_to_be_clickable((By.ID, "generate"))).click()  # refused with the sentence, no traceback
    wait.until(lambda _: "does not contain the subject word" in browser.find_element(By.TAG_NAME, "body").text
               and "Traceback" not in browser.page_source)
    # using the second subject too switches the shape to twice as wide (each subject its own half)
    shape = "#shape input[type=radio]:checked"
    browser.find_element(By.XPATH, "//button[contains(normalize-space(), 'settings')]").click()
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, shape))
    assert browser.find_element(By.CSS_SELECTOR, shape).get_attribute("value") == "square"
    browser.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")[1].click()
    wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, shape).get_attribute("value").startswith("twice"))
