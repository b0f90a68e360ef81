"""The chat page `ondevice serve` serves at GET /, tested over HTTP (its headers, its files,
the API key's exemptions) and in a real browser: headless Chromium driven by selenium against a
real server on the demo model. Streaming, the stats line, Stop freeing the server's slot,
conversations kept across a reload, delete, hostile Markdown rendered as text, the API key
flow, and the layout at 360 and 1280 px wide (screenshots saved in the test's tmp_path).

The browser tests need Debian's `chromium` and `chromium-driver` and the `selenium` package
(in the `test` extra; `.ci/run` installs the two system packages); without them they skip
and say what to install.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from fnmatch import fnmatch

import httpx
import pytest
from server_fixtures import ROOT, ServerProcess
from starlette.testclient import TestClient

from ondevice.server import create_app, web
from ondevice.server.config import ServerConfig
from ondevice.server.service import Service
from ondevice.stats import Stats

KEY = "sk-web-7d31"
STATIC = ROOT / "ondevice" / "server" / "static"
# Stats.summary()'s shape: the page shows the server's copy of the line the REPL prints.
SUMMARY = re.compile(
    r"^\d+ tokens · prompt \d+/\d+ at [\d.]+ tok/s · generation [\d.]+ tok/s · "
    r"TTFT \d+ ms · RSS \d+ MiB \(peak \d+ MiB\)$"
)


# --- over HTTP, in-process (no model, no browser) ----------------------------------------
def _client(**config) -> TestClient:
    cfg = ServerConfig(**config)
    return TestClient(create_app(Service(cfg, load=lambda: None), cfg), base_url="http://127.0.0.1")


def test_the_page_and_its_files_come_with_a_strict_csp():
    with _client() as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script src="static/chat.js"' in page.text
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                          "connect-src 'self'", "img-src 'self' data:",
                          "frame-ancestors 'none'"):  # fmt: skip
            assert directive in csp
        assert "unsafe" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        js, css = c.get("/static/chat.js"), c.get("/static/chat.css")
        assert js.headers["content-type"] == "text/javascript; charset=utf-8"
        assert css.headers["content-type"] == "text/css; charset=utf-8"
        assert js.headers["content-security-policy"] == csp
        assert js.text == (STATIC / "chat.js").read_text()
        for path in ("/static/index.html", "/static/", "/static/../web.py", "/index.html"):
            assert c.get(path).status_code == 404, path


def test_the_page_is_public_but_the_api_still_needs_the_key():
    with _client(api_key=KEY) as c:
        for path in web.PUBLIC_PATHS:
            assert c.get(path).status_code == 200, path
        assert c.get("/health").status_code == 503  # public, and the model never loads here
        for path in ("/v1/models", "/metrics", "/api/tags", "/openapi.json", "/static/x.js",
                     "/static/chat.js/", "/static"):  # fmt: skip
            assert c.get(path).status_code == 401, path
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_web_leaves_the_api_and_a_line_at_root():
    with _client(web=False) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.text == "ondevice is running"
        assert c.get("/static/chat.js").status_code == 404
    with _client(web=False, api_key=KEY) as c:
        assert c.get("/").status_code == 401  # without the page, nothing at / is public


def test_the_page_loads_nothing_from_anywhere_else_and_ships_in_the_wheel():
    text = {p.name: p.read_text() for p in STATIC.iterdir()}
    assert set(text) == {"index.html", "chat.js", "chat.css"}
    for name, body in text.items():
        assert "://" not in body, f"{name} names an address elsewhere"
    html = text["index.html"]
    assert "<style" not in html and not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\son\w+=", html), "inline handlers (the CSP would block them)"
    assert "@import" not in text["chat.css"] and "url(" not in text["chat.css"]
    assert "innerHTML" not in text["chat.js"] and "insertAdjacentHTML" not in text["chat.js"]
    # Every file is package data (pyproject's globs), read through importlib.resources.
    globs = re.search(r'"ondevice\.server" = \[(.*?)\]', (ROOT / "pyproject.toml").read_text())
    assert globs, "pyproject.toml ships no package data for ondevice.server"
    patterns = re.findall(r'"([^"]+)"', globs.group(1))
    for name in text:
        assert any(fnmatch(f"static/{name}", p) for p in patterns), name
        assert web.read(name).decode() == text[name]


def test_the_summary_pattern_is_what_the_repl_prints():
    st = Stats(completion_tokens=12, prompt_tokens=30, prompt_eval_tokens=30, prompt_tps=812.5,
               generation_tps=51.2, ttft_s=0.0612, rss_bytes=300 << 20,
               peak_rss_bytes=310 << 20)  # fmt: skip
    assert SUMMARY.match(st.summary()), st.summary()


def test_the_server_sends_the_repls_stats_line(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    numbers = r["ondevice"]
    line = numbers["summary"]
    assert SUMMARY.match(line), line
    assert line.startswith(f"{numbers['completion_tokens']} tokens · prompt ")
    ttft_ms = float(re.search(r"TTFT (\d+) ms", line).group(1))
    assert abs(ttft_ms - numbers["ttft_s"] * 1000) <= 1  # the field is rounded to 0.1 ms


# --- in the browser ----------------------------------------------------------------------
def _missing() -> list[str]:
    out = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        out.append("the selenium package (pip install selenium; it is in the test extra)")
    if not shutil.which("chromium"):
        out.append("Debian's chromium (apt-get install chromium)")
    if not shutil.which("chromedriver"):
        out.append("Debian's chromium-driver (apt-get install chromium-driver)")
    return out


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        pytest.skip("the chat page's browser tests need " + ", ".join(missing))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=DriverService(shutil.which("chromedriver")))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(demo_path):
    with ServerProcess(demo_path, "--parallel", "2", "--ctx", "1024") as s:
        yield s
        log = s.log
    assert "Traceback" not in log, log


def _size(driver, width: int, height: int = 800) -> None:
    """The viewport exactly `width` x `height` CSS px (a phone's at 360: touch, mobile)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})  # fmt: skip
    assert driver.execute_script("return window.innerWidth") == width


def _wait(driver, condition, timeout: float = 60, what: str = "") -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(
        lambda d: condition(d), message=what
    )


def _open(driver, url: str, width: int = 1280, model: str = "demo") -> None:
    _size(driver, width)
    driver.get(url + "/")
    _wait(driver, lambda d: _text(d, "#model-name") == model, 30, "the model's name")


def _text(driver, css: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null", css
    )


def _set(driver, css: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    field.send_keys(value)


def _settings(driver, temperature: str, max_tokens: str) -> None:
    # The fields live in the drawer at narrow widths; set them as the page's own input would.
    driver.execute_script(
        "for (const [id, v] of [['temperature', arguments[0]], ['max-tokens', arguments[1]]]) {"
        "  const f = document.getElementById(id); f.value = v;"
        "  f.dispatchEvent(new Event('input')); }",
        temperature,
        max_tokens,
    )


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _last_reply(driver) -> dict:
    return driver.execute_script(
        "const a = [...document.querySelectorAll('#transcript article.assistant')].pop();"
        "return a ? {text: a.querySelector('.text').textContent,"
        "  stats: a.querySelector('.stats').textContent, busy: a.getAttribute('aria-busy')}"
        "  : null"
    )


def _finished(driver, timeout: float = 90) -> dict:
    _wait(
        driver,
        lambda d: (r := _last_reply(d)) and r["busy"] == "false" and r["stats"],
        timeout,
        "the reply's stats line",
    )
    return _last_reply(driver)


def _severe_logs(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


_WATCH = """
window.__lengths = []; window.__shift = 0;
new PerformanceObserver((list) => { for (const e of list.getEntries())
  if (!e.hadRecentInput) window.__shift += e.value; }).observe({type: 'layout-shift'});
const t = document.getElementById('transcript');
new MutationObserver(() => {
  const a = [...t.querySelectorAll('article.assistant')].pop();
  if (a) window.__lengths.push(a.querySelector('.text').textContent.length);
}).observe(t, {subtree: true, childList: true, characterData: true});
const r = document.getElementById('composer').getBoundingClientRect();
return [r.top, r.height];
"""


def test_a_message_streams_a_reply_then_the_stats_line(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open(browser, server.url)
    browser.get_log("browser")  # only this test's messages from here on
    browser.find_element(By.ID, "new-chat").click()
    _settings(browser, "0", "40")
    composer = browser.execute_script(_WATCH)
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("Name three colours.", Keys.SHIFT, Keys.ENTER, Keys.NULL, "One per line.")
    assert box.get_attribute("value") == "Name three colours.\nOne per line."
    assert not browser.find_elements(By.CSS_SELECTOR, "#transcript article")  # not sent
    box.send_keys(Keys.ENTER)
    _wait(browser, lambda d: (r := _last_reply(d)) and r["text"], 60, "streamed text")
    assert _text(browser, "#stop") == "Stop"
    assert browser.find_element(By.ID, "stop").is_enabled()
    reply = _finished(browser)
    assert SUMMARY.match(reply["stats"]), reply["stats"]
    assert "tok/s" in reply["stats"] and "TTFT" in reply["stats"]
    user = browser.find_element(By.CSS_SELECTOR, "#transcript article.user .text").text
    assert user == "Name three colours.\nOne per line."
    lengths = [n for n in browser.execute_script("return window.__lengths") if n]
    assert len(set(lengths)) >= 3, f"the reply came in one piece: {lengths}"
    assert lengths == sorted(lengths)
    # Nothing moved while it streamed: no layout shift, the composer where it was.
    assert browser.execute_script("return window.__shift") < 0.001
    rect = browser.execute_script(
        "const r = document.getElementById('composer').getBoundingClientRect();"
        "return [r.top, r.height]"
    )
    assert rect == composer
    titles = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#conversations .open")]
    assert "Name three colours. One per line." in titles
    assert browser.find_element(By.ID, "send").is_enabled()
    assert _severe_logs(browser) == []


def test_stop_frees_the_servers_slot(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    for _attempt in range(3):
        browser.find_element(By.ID, "new-chat").click()
        _settings(browser, "1", "400")
        before = server.metrics()
        _send(browser, "Write a long story about a dragon who learns to bake bread.")
        _wait(browser, lambda d: (r := _last_reply(d)) and len(r["text"]) > 5, 60, "text")
        shot = tmp_path / "chat-streaming-1280px.png"
        browser.save_screenshot(str(shot))
        browser.find_element(By.ID, "stop").click()
        reply = _wait(browser, lambda d: (r := _last_reply(d)) and r["busy"] == "false" and r)
        if reply["stats"] != "[stopped]":
            assert SUMMARY.match(reply["stats"])  # it ended on its own before Stop: again
            continue
        after = server.wait_slots_free()
        assert after["cancelled_total"] == before["cancelled_total"] + 1
        assert after["generated_tokens_total"] - before["generated_tokens_total"] < 400
        assert _text(browser, "#status") == "Stopped."
        assert browser.find_element(By.ID, "send").is_enabled()
        assert not browser.find_element(By.ID, "stop").is_enabled()
        print(f"screenshot: {shot}")
        return
    pytest.fail("the reply always ended before Stop was pressed")


def test_conversations_survive_a_reload_and_delete_removes_them(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    browser.execute_script("localStorage.removeItem('ondevice.chat.v1')")
    browser.refresh()
    _wait(browser, lambda d: _text(d, "#model-name") == "demo", 30)
    _settings(browser, "0", "12")
    for text in ("What is the capital of France?", "And of Italy?"):
        _send(browser, text)
        _finished(browser)
    browser.find_element(By.ID, "new-chat").click()
    _send(browser, "Say hello.")
    said = _finished(browser)["text"]
    browser.refresh()
    _wait(browser, lambda d: _text(d, "#model-name") == "demo", 30)
    opens = browser.find_elements(By.CSS_SELECTOR, "#conversations .open")
    assert [b.text for b in opens] == ["Say hello.", "What is the capital of France?"]
    assert opens[0].get_attribute("aria-current") == "true"  # the one open before the reload
    assert _last_reply(browser)["text"] == said
    opens[1].click()
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#transcript .user .text")]
    assert users == ["What is the capital of France?", "And of Italy?"]
    assert SUMMARY.match(_last_reply(browser)["stats"])  # kept with the reply
    browser.find_element(By.CSS_SELECTOR, "#conversations li:nth-child(2) .delete").click()
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#conversations .open")] == [
        "Say hello."
    ]
    assert not browser.find_elements(By.CSS_SELECTOR, "#transcript article")
    browser.refresh()
    _wait(browser, lambda d: _text(d, "#model-name") == "demo", 30)
    stored = json.loads(browser.execute_script("return localStorage['ondevice.chat.v1']"))
    assert [c["title"] for c in stored["conversations"]] == ["Say hello."]


HOSTILE = (
    "Here you go:\n\n<script>window.__pwned=1</script>\n\n"
    '<img src=x onerror="window.__pwned=1"> and **<b onclick="window.__pwned=1">bold</b>**\n\n'
    "[click me](javascript:window.__pwned=1) [data](data:text/html,<script>x</script>) "
    '<a href="javascript:window.__pwned=1">raw link</a> <iframe src="/"></iframe>'
)
SAMPLE = (
    "## A heading\n\nSome **bold**, some *italic* and `inline code`.\n\n"
    "```python\nprint('<b>not bold</b>')\n```\n\n"
    "- one\n- two\n- three\n\n1. first\n2. second\n\n"
    "> quoted\n\nSee [the docs](https://example.org/docs) and "
    "[not a link](javascript:alert(1))."
)


def _stored(*conversations: tuple[str, list[dict]]) -> str:
    now = int(time.time() * 1000)
    convs = [{"id": f"c{i}", "title": title, "created": now - i, "updated": now - i,
              "messages": messages} for i, (title, messages) in enumerate(conversations)]  # fmt: skip
    return json.dumps({"current": "c0", "conversations": convs})


def _seed(driver, stored: str) -> None:
    driver.execute_script("localStorage.setItem('ondevice.chat.v1', arguments[0])", stored)
    driver.refresh()
    _wait(driver, lambda d: _text(d, "#model-name") == "demo", 30)


def test_hostile_markdown_is_text_and_markdown_renders(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    browser.get_log("browser")
    title = '<img src=x onerror="window.__pwned=1">'
    _seed(browser, _stored((title, [
        {"role": "user", "content": "<script>window.__pwned=1</script>"},
        {"role": "assistant", "content": HOSTILE, "stats": "1 tokens"},
        {"role": "user", "content": "And some Markdown?"},
        {"role": "assistant", "content": SAMPLE},
    ])))  # fmt: skip
    time.sleep(0.5)  # an onerror or a script would have run by now
    assert browser.execute_script("return window.__pwned") is None
    page = browser.find_element(By.TAG_NAME, "body")
    for tag in ("script", "img", "iframe", "b", "object", "embed", "svg"):
        found = page.find_elements(By.CSS_SELECTOR, f"#transcript {tag}, #sidebar {tag}")
        assert not found, f"a <{tag}> element from model text"
    transcript = browser.find_element(By.ID, "transcript").text
    assert "<script>window.__pwned=1</script>" in transcript
    assert '<img src=x onerror="window.__pwned=1">' in transcript
    assert "[click me](javascript:window.__pwned=1)" in transcript
    assert browser.find_element(By.CSS_SELECTOR, "#conversations .open").text == title
    links = browser.find_elements(By.CSS_SELECTOR, "#transcript a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/docs"]
    assert set(links[0].get_attribute("rel").split()) >= {"noopener", "noreferrer"}
    reply = browser.find_elements(By.CSS_SELECTOR, "#transcript article.assistant")[1]
    assert reply.find_element(By.CSS_SELECTOR, "h4").text == "A heading"
    assert reply.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert reply.find_element(By.CSS_SELECTOR, "em").text == "italic"
    assert reply.find_element(By.CSS_SELECTOR, "p code").text == "inline code"
    assert reply.find_element(By.CSS_SELECTOR, "pre code").text == "print('<b>not bold</b>')"
    assert [li.text for li in reply.find_elements(By.CSS_SELECTOR, "ul li")] == [
        "one", "two", "three"]  # fmt: skip
    assert [li.text for li in reply.find_elements(By.CSS_SELECTOR, "ol li")] == [
        "first", "second"]  # fmt: skip
    assert reply.find_element(By.CSS_SELECTOR, "blockquote").text == "quoted"
    assert "[not a link](javascript:alert(1))" in reply.text
    assert _severe_logs(browser) == []


def test_every_control_has_a_label(server, browser):
    _open(browser, server.url)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, textarea, select, button')].filter(e =>"
        "  !(e.labels && e.labels.length) && !e.getAttribute('aria-label') &&"
        "  !(e.tagName === 'BUTTON' && e.textContent.trim())).map(e => e.outerHTML)"
    )
    assert unlabelled == []


def test_layout_at_360_and_1280_px(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    _seed(browser, _stored(
        ("Markdown, please", [
            {"role": "user", "content": "Show me some Markdown."},
            {"role": "assistant", "content": SAMPLE, "model": "demo",
             "stats": "58 tokens · prompt 31/31 at 812.4 tok/s · generation 49.7 tok/s · "
                      "TTFT 64 ms · RSS 292 MiB (peak 301 MiB)"}]),
        ("An older chat about bread", [{"role": "user", "content": "Bread?"}]),
    ))  # fmt: skip
    _settings(browser, "0", "40")
    _send(browser, "What is the capital of France?")
    _finished(browser)
    shots = {}
    for width in (1280, 360):
        _size(browser, width)
        browser.execute_script(
            "const t = document.getElementById('transcript'); t.scrollTop = t.scrollHeight"
        )
        time.sleep(0.3)
        sizes = browser.execute_script(
            "const r = (id) => document.getElementById(id).getBoundingClientRect();"
            "return {scroll: document.documentElement.scrollWidth, send: r('send').right,"
            "  composer: r('composer').bottom, sidebar: r('sidebar').right}"
        )
        assert sizes["scroll"] <= width, f"wider than the screen at {width} px"
        assert sizes["send"] <= width and sizes["composer"] <= 800
        shots[width] = tmp_path / f"chat-{width}px.png"
        browser.save_screenshot(str(shots[width]))
        toggle = browser.find_element(By.ID, "chats-toggle")
        sidebar = browser.find_element(By.ID, "sidebar")
        if width == 1280:
            assert not toggle.is_displayed() and sidebar.is_displayed()
        else:
            assert toggle.is_displayed() and sizes["sidebar"] <= 0  # the drawer is closed
            toggle.click()
            _wait(browser, lambda d: d.execute_script(
                "return document.getElementById('sidebar').getBoundingClientRect().left") >= 0,
                5)  # fmt: skip
            assert toggle.get_attribute("aria-expanded") == "true"
            time.sleep(0.3)
            shots["drawer"] = tmp_path / "chat-360px-drawer.png"
            browser.save_screenshot(str(shots["drawer"]))
            browser.find_element(By.CSS_SELECTOR, "#conversations .open").click()
            assert toggle.get_attribute("aria-expanded") == "false"
    # The dark scheme (prefers-color-scheme), at desktop width.
    _size(browser, 1280)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})  # fmt: skip
    try:
        shots["dark"] = tmp_path / "chat-1280px-dark.png"
        browser.save_screenshot(str(shots["dark"]))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    for path in shots.values():
        assert path.stat().st_size > 5000
        print(f"screenshot: {path}")


# --- the API key --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key_server(demo_path):
    with ServerProcess(demo_path, "--api-key", KEY, "--parallel", "1", "--ctx", "512") as s:
        yield s


def test_with_a_key_the_page_asks_for_it_then_chats(key_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    assert httpx.get(f"{key_server.url}/").status_code == 200
    assert httpx.get(f"{key_server.url}/v1/models").status_code == 401
    _size(browser, 360)
    browser.get(key_server.url + "/")
    dialog = browser.find_element(By.ID, "key-dialog")
    _wait(browser, lambda d: dialog.get_attribute("open") is not None, 30, "the key dialog")
    assert _text(browser, "#model-name") == "API key needed"
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 360
    assert browser.find_element(By.CSS_SELECTOR, "label[for=api-key]").text == "API key"
    shot = tmp_path / "key-dialog-360px.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    _set(browser, "#api-key", "wrong")
    browser.find_element(By.ID, "key-submit").click()
    _wait(browser, lambda d: _text(d, "#key-error") == "That key was refused.", 10)
    _set(browser, "#api-key", KEY)
    browser.find_element(By.ID, "key-submit").click()
    _wait(browser, lambda d: _text(d, "#model-name") == "demo", 10, "the model's name")
    assert dialog.get_attribute("open") is None
    assert browser.execute_script("return sessionStorage['ondevice.apiKey']") == KEY
    assert browser.execute_script("return localStorage['ondevice.apiKey']") is None
    _settings(browser, "0", "8")
    _send(browser, "Hi!")
    assert SUMMARY.match(_finished(browser)["stats"])
    # A key the server no longer takes: the page asks again and keeps the message.
    browser.execute_script("sessionStorage['ondevice.apiKey'] = 'stale'")
    _send(browser, "Still there?")
    _wait(browser, lambda d: dialog.get_attribute("open") is not None, 10, "asked again")
    assert _text(browser, "#key-error") == "The key was refused."
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Still there?"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#transcript article")) == 2
