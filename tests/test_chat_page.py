"""The chat page at serve.py's / in a real headless browser (Debian's chromium, driven by selenium
through the system's chromedriver, so nothing is downloaded): type a question, see the answer stream
in piece by piece, ask again in the same conversation. Skipped where chromium or selenium is absent
(install.sh --test installs them where apt-get can)."""
import os
import shutil

import pytest

from chat_checkpoint import Server, write_chat_checkpoint

selenium = pytest.importorskip("selenium")
pytest.importorskip("fastapi")

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium and chromedriver here")

# Records the answer's text each time it changes, so the test can tell a streamed answer from one
# that appeared whole.
RECORD_CHANGES = """
window.seen = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.assistant');
  if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out_dir = write_chat_checkpoint(tmp_path_factory.mktemp("page") / "out-chat")
    server = Server(out_dir, "--max_new_tokens=48")
    yield server
    assert "Traceback" not in server.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager never fetches a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,700",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def ask(browser, question):
    """Type the question, press Enter, wait until the answer is done; the answer's element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    done_before = len(browser.find_elements(By.CSS_SELECTOR, ".assistant.done"))
    box = browser.find_element(By.ID, "input")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant.done")) > done_before)
    return browser.find_elements(By.CSS_SELECTOR, ".assistant.done")[-1]


def test_the_page_streams_an_answer_and_keeps_the_conversation(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "model").text == server.model_id)
    browser.execute_script(RECORD_CHANGES)
    answer = ask(browser, "滚滚长江东逝水？")
    assert answer.text.strip() and not browser.find_elements(By.CSS_SELECTOR, ".note")
    seen = [text for text in browser.execute_script("return window.seen") if text]
    # the answer grew a piece at a time, each state a start of the final text
    assert len(set(seen)) > 1 and all(answer.get_attribute("textContent").startswith(text) for text in seen)
    second = ask(browser, "浪花淘尽英雄？")
    assert second.text.strip()
    shown = [(e.get_attribute("class").split()[1], e.text) for e in browser.find_elements(By.CSS_SELECTOR, ".message")]
    assert [role for role, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[0][1] == "滚滚长江东逝水？" and shown[2][1] == "浪花淘尽英雄？"
    # a look at it, for a person (pytest keeps tmp_path for the last runs; PAGE_SCREENSHOT names a file to keep)
    browser.save_screenshot(os.environ.get("PAGE_SCREENSHOT") or str(tmp_path / "chat_page.png"))
