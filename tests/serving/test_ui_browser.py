"""The page to try the model (``GET /ui``, issue 17): served self-contained, and driven end to end in a real
headless Chromium against a real server process on the synthetic bundle.

The browser test needs Debian's ``chromium`` and ``chromedriver`` (``apt-get install chromium chromium-driver``) and
``selenium`` (the ``dev`` extra); without them it skips and says which one is missing. It saves screenshots of the
page under pytest's tmp dir and, when ``PROMPTCLIP_SCREENSHOT_DIR`` is set (``.ci/run`` sets ``ci_artifacts/``),
there too.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from promptclip.server import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ui-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = os.environ.get("PROMPTCLIP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PROMPTCLIP_CHROMEDRIVER", "/usr/bin/chromedriver")
#: the flags that work in this project's containers (no sandbox: tests may run as root; no network side channels)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")
#: a class name that is markup: the page must show it as text, never run it
XSS_NAME = '<img src=x onerror="document.title=\'XSS\'"> zebra'
#: src/href/action pointing off this origin (absolute or protocol-relative)
EXTERNAL_REF = re.compile(r"""\b(?:src|href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.I)


def _picture_png(size: int = 160) -> bytes:
    """A small drawn picture (sky, sun, hill, house) as PNG: something a person recognises in the screenshot."""
    img = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse((size * 0.66, size * 0.08, size * 0.9, size * 0.32), fill=(250, 210, 60))
    draw.ellipse((-size * 0.3, size * 0.62, size * 1.3, size * 1.5), fill=(80, 160, 80))
    draw.rectangle((size * 0.2, size * 0.45, size * 0.5, size * 0.72), fill=(200, 70, 60))
    roof = [(size * 0.16, size * 0.47), (size * 0.35, size * 0.3), (size * 0.54, size * 0.47)]
    draw.polygon(roof, fill=(110, 60, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- the page as served (no browser) -----------------------------------------------------------------


def _check_page(resp: httpx.Response | object) -> str:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/html"), resp.headers
    html = resp.text
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"https?://", html), "the page must work offline: no absolute URL in it"
    assert not EXTERNAL_REF.search(html), EXTERNAL_REF.search(html)
    style = "".join(re.findall(r"<style>(.*?)</style>", html, flags=re.S))
    assert "url(" not in style and "@import" not in style and "@font-face" not in style, "system fonts, no files"
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html, (
        "class names are user input: the page builds its DOM with textContent only")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", csp), csp  # only the page's own inline script runs
    return html


def test_ui_page_is_self_contained_and_ships_as_package_data():
    """GET /ui through the service's extra routes: HTML, no external URL, a CSP; and the file is package data."""
    from starlette.testclient import TestClient

    from serving.service import EXTRA_ROUTES, UI_PAGE

    with TestClient(EXTRA_ROUTES) as client:
        html = _check_page(client.get("/ui"))
    for needle in ('id="file-input"', 'id="predictions"', 'id="none-banner"', 'id="class-list"', 'id="token-input"',
                   'id="add-images-form"', "sessionStorage", "keep_rate", "none_of_these"):
        assert needle in html, needle
    # a wheel / editable install ships the page: pyproject's package data and the Bento's include cover it
    package_data = (REPO_ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    patterns = re.search(r'^serving = \[(.*)\]$', package_data, flags=re.M)
    assert patterns, "pyproject.toml: [tool.setuptools.package-data] has no line for serving"
    assert any((REPO_ROOT / "serving").glob(p.strip(' "')) for p in patterns.group(1).split(",")), patterns.group(0)
    assert (REPO_ROOT / "serving" / Path(*UI_PAGE)).is_file()
    assert "serving/static/*.html" in (REPO_ROOT / "bentofile.yaml").read_text()
    from serving.openapi import openapi_document

    assert "/ui" in openapi_document()["info"]["description"]  # the docs at / point at the page


# -- a real server process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_server(synthetic_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    """``bentoml serve`` on the synthetic bundle with a token and a state dir (writes need the token)."""
    tmp = tmp_path_factory.mktemp("ui-server")
    with ServerProcess(synthetic_bundle.path, state_dir=tmp / "state", token=TOKEN, log_path=tmp / "server.log",
                       extra_env={"PYTHONPATH": str(REPO_ROOT)}) as server:
        server.wait_ready(timeout=120)
        yield server


def test_ui_is_served_by_the_real_server(ui_server):
    _check_page(httpx.get(f"{ui_server.url}/ui", timeout=10))


# -- the page in headless Chromium ---------------------------------------------------------------------


def _browser_or_skip():
    """A headless Chromium driven by selenium, or skip naming what is missing and how to install it."""
    missing = [(path, pkg) for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
               if not os.access(path, os.X_OK)]
    if missing:
        names = ", ".join(path for path, _ in missing)
        pytest.skip(f"{names} not found: install with `apt-get install chromium chromium-driver` "
                    "(or point PROMPTCLIP_CHROMIUM / PROMPTCLIP_CHROMEDRIVER at them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: `pip install -e '.[dev]'` (or `pip install selenium`)")
    return webdriver, Service


@pytest.fixture(scope="module")
def chromium() -> tuple:
    """selenium's ``webdriver`` and ``Service``, or skip (module scope: before the server is started for nothing)."""
    return _browser_or_skip()


@pytest.fixture
def browser(chromium, tmp_path) -> Iterator[object]:
    webdriver, Service = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER,
                                                                log_output=str(tmp_path / "chromedriver.log")))
    try:
        yield driver
    finally:
        driver.quit()


def _save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "chromium could not take the screenshot"
    print(f"screenshot: {path}")
    out_dir = os.environ.get("PROMPTCLIP_SCREENSHOT_DIR")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        kept = Path(out_dir) / name
        shutil.copyfile(path, kept)
        print(f"screenshot: {kept.resolve()}")
    return path


def test_ui_in_headless_chromium(chromium, ui_server, browser, tmp_path):
    """Upload -> the server's top-k shown in order; add a class (the token is asked for, kept, the write retried),
    it is listed and ranked by the next classification; a refused name shows the server's message; remove it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    js = driver.execute_script

    def listed_classes() -> list[str]:
        return js("return Array.from(document.querySelectorAll('#class-list .class-name'), e => e.textContent)")

    def predictions() -> list[str]:
        return js("return Array.from(document.querySelectorAll('#predictions .pred-name'), e => e.textContent)")

    def result_version() -> str:
        return js("var r = document.getElementById('result'); return r.dataset.state === 'done' ? "
                  "r.dataset.version : null")

    def server_ranking(top_k: int) -> dict:
        resp = httpx.post(f"{ui_server.url}/classify", files={"image": ("picture.png", png, "image/png")},
                          data={"top_k": str(top_k)}, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    driver.get(f"{ui_server.url}/ui")
    wait.until(lambda d: "version" in d.find_element(By.ID, "classes-meta").text)
    start = httpx.post(f"{ui_server.url}/classes", json={}, timeout=10).json()
    assert listed_classes() == start["names"]

    # 1. upload through the file input: the server's ranking, in its order, top-1 first
    png = _picture_png()
    image_path = tmp_path / "picture.png"
    image_path.write_bytes(png)
    driver.find_element(By.ID, "file-input").send_keys(str(image_path))
    wait.until(lambda d: result_version() is not None)
    expected = server_ranking(5)
    assert predictions() == [p["name"] for p in expected["predictions"]]
    top1 = driver.find_element(By.CSS_SELECTOR, "#predictions li:first-child .pred-name").text
    assert top1 == expected["predictions"][0]["name"]
    assert driver.find_element(By.ID, "result-meta").text == f"Ranked against class list version {start['version']}."
    assert not driver.find_element(By.ID, "none-banner").is_displayed()  # none_of_these absent: no state shown
    _save_screenshot(driver, tmp_path, "ui_classified.png")

    # 2. show every class from now on (the page caps top_k at the list's size)
    top_k = driver.find_element(By.ID, "top-k")
    js("arguments[0].value = '50'", top_k)
    # 3. add a class whose name is markup: 401 -> the token is asked for -> kept in sessionStorage -> retried
    driver.find_element(By.ID, "add-names").send_keys(XSS_NAME)
    driver.find_element(By.ID, "add-names-button").click()
    wait.until(lambda d: d.find_element(By.ID, "token-panel").is_displayed())
    assert "Authorization" in driver.find_element(By.ID, "token-why").text  # the server's message, as text
    assert driver.switch_to.active_element == driver.find_element(By.ID, "token-input")
    driver.find_element(By.ID, "token-input").send_keys(TOKEN)
    driver.find_element(By.ID, "token-save").click()
    wait.until(lambda d: XSS_NAME in listed_classes())
    assert js("return sessionStorage.getItem('promptclip.token')") == TOKEN
    assert not driver.find_element(By.ID, "token-panel").is_displayed()
    after_add = httpx.post(f"{ui_server.url}/classes", json={}, timeout=10).json()
    assert after_add["version"] > start["version"] and XSS_NAME in after_add["names"]
    assert driver.find_element(By.ID, "classes-meta").text == f"{len(after_add['names'])} classes, version " \
                                                              f"{after_add['version']}"
    # the markup stayed text: no element was made from it, nothing ran
    assert driver.title == "promptclip: try the model"
    assert not driver.find_elements(By.CSS_SELECTOR, "#class-list img, #predictions img")

    # 4. the next classification (run by the page after the change) ranks the new class, as the server does
    wait.until(lambda d: result_version() == str(after_add["version"]))
    expected = server_ranking(len(after_add["names"]))
    assert predictions() == [p["name"] for p in expected["predictions"]]
    assert XSS_NAME in predictions()
    _save_screenshot(driver, tmp_path, "ui_class_added.png")

    # 5. a refused name: the server's message is shown as a sentence, never as raw JSON
    driver.find_element(By.ID, "add-names").send_keys("bad <end_of_text> name")
    driver.find_element(By.ID, "add-names-button").click()
    status = driver.find_element(By.ID, "classes-status")
    wait.until(lambda d: "reserved token" in status.text, message=f"shown: {status.text!r}")
    assert not status.text.lstrip().startswith("{") and '"error"' not in status.text

    # 6. remove the class with its button: the stored token is used (no prompt), the list and ranking follow
    for item in driver.find_elements(By.CSS_SELECTOR, "#class-list li"):
        if item.find_element(By.CSS_SELECTOR, ".class-name").text == XSS_NAME:
            item.find_element(By.TAG_NAME, "button").click()
            break
    else:
        raise AssertionError(f"{XSS_NAME!r} has no row in the class list")
    wait.until(lambda d: XSS_NAME not in listed_classes())
    assert not driver.find_element(By.ID, "token-panel").is_displayed()
    final = httpx.post(f"{ui_server.url}/classes", json={}, timeout=10).json()
    assert final["names"] == start["names"]
    wait.until(lambda d: result_version() == str(final["version"]))
    assert XSS_NAME not in predictions()
    assert driver.title == "promptclip: try the model"


#: Adds the fields of issue 17's open-set and example-image contracts to the real server's answers (as the service
#: will send them once those parts land), so the page's handling of them is tested now: every prediction gets a
#: ``confidence``, the answer ``none_of_these: true`` and its ``open_set`` rule; ``/classes`` gets provenance.
CONTRACT_SHIM = """
(function () {
  var realFetch = window.fetch.bind(window);
  window.fetch = function (url, options) {
    return realFetch(url, options).then(function (resp) {
      var path = new URL(String(url), location.href).pathname;
      if (path === "/classify") window.__classifyCalls = (window.__classifyCalls || 0) + 1;
      if (!resp.ok || (path !== "/classify" && path !== "/classes")) return resp;
      return resp.json().then(function (body) {
        if (path === "/classify") {
          body.predictions.forEach(function (p, i) { p.confidence = 0.3 / (i + 1); });
          body.none_of_these = true;
          body.open_set = {rule: "max_cosine", keep_rate: 0.95, threshold: 0.2512, basis: "export"};
        } else {
          body.classes = body.names.map(function (n, i) {
            return i === 0 ? {name: n, source: "images", num_images: 4}
                 : i === 1 ? {name: n, source: "text+images", num_images: 1} : {name: n, source: "text", num_images: 0};
          });
        }
        return new Response(JSON.stringify(body), {status: 200, headers: {"Content-Type": "application/json"}});
      });
    });
  };
})();
"""


def test_ui_shows_none_of_these_confidence_and_provenance(chromium, ui_server, browser, tmp_path):
    """The page against the contract fields other parts of issue 17 add (injected into the real server's answers):
    the "None of these" state, each class's confidence, the open-set rule, and each class's provenance."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CONTRACT_SHIM})
    driver.get(f"{ui_server.url}/ui")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#class-list .badge"))
    badges = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#class-list .badge")]
    assert badges[:3] == ["from images (4 images)", "name + images (1 image)", "from its name"], badges

    image_path = tmp_path / "picture.png"
    image_path.write_bytes(_picture_png())
    driver.find_element(By.ID, "file-input").send_keys(str(image_path))
    wait.until(lambda d: d.execute_script("return document.getElementById('result').dataset.state") == "done")
    banner = driver.find_element(By.ID, "none-banner")
    assert banner.is_displayed() and banner.text.startswith("None of these")
    assert "max_cosine below its threshold" in banner.text
    confidences = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#predictions .pred-conf")]
    assert confidences[:2] == ["confidence 30.0%", "confidence 15.0%"], confidences
    meta = driver.find_element(By.ID, "result-meta").text
    assert "open-set rule max_cosine" in meta and "keeps 95.0% of known images" in meta and "threshold 0.251" in meta
    _save_screenshot(driver, tmp_path, "ui_none_of_these.png")

    # a dropped and a pasted image are classified as a picked one is
    b64 = base64.b64encode(_picture_png(96)).decode()
    for event in ("new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})",
                  "new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true})"):
        calls = driver.execute_script("return window.__classifyCalls")
        driver.execute_script(f"""
            var bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            var dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.png", {{type: "image/png"}}));
            document.getElementById("drop").dispatchEvent({event});""", b64)
        wait.until(lambda d, calls=calls: d.execute_script(
            "return window.__classifyCalls > arguments[0] && "
            "document.getElementById('result').dataset.state === 'done'", calls), message=event)
        assert driver.find_elements(By.CSS_SELECTOR, "#predictions li"), event
