"""Drive `orchestrate ui` in headless Chromium (Debian's chromium + chromedriver, through
Selenium) and check the rendered DOM of the main pages; save a screenshot of each.

usage: browser.py BASE_URL OUT_DIR CHECK...   (checks: runs, run:ID, stage:ID:STAGE, report:ID:STAGE,
compare:A:B, curves:A:B:STAGE, live, page:NAME:PATH)

Prints `CHECK ok` per check; any failed expectation raises (non-zero exit)."""

import os
import sys
import time
from urllib.parse import quote

os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def browser(profile):
    for path in (CHROMIUM, DRIVER):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: `bash .ci/chromium` installs Debian's chromium and chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


def seg(s):
    return quote(s, safe="-_.~@")


def shot(d, out, name):
    # The whole page: the window grows to the document's height for the screenshot.
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1400, max(600, min(height + 40, 4000)))
    d.save_screenshot(os.path.join(out, name + ".png"))
    d.set_window_size(1400, 1000)


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def check_runs(d, base, out):
    d.get(base + "/")
    rows = d.find_elements(By.CSS_SELECTOR, "#runs tr.run")
    expect(len(rows) >= 2, f"run list shows {len(rows)} runs")
    statuses = [r.find_element(By.CSS_SELECTOR, ".pill").text for r in rows]
    expect("failed" in statuses and "ok" in statuses, f"statuses {statuses}")
    # Follow the newest run's link like a person would.
    rows[0].find_element(By.CSS_SELECTOR, "a").click()
    WebDriverWait(d, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.dag"))
    expect("/runs/" in d.current_url, d.current_url)
    d.get(base + "/")
    shot(d, out, "runs")


def check_run(d, base, out, run):
    d.get(f"{base}/runs/{run}")
    nodes = d.find_elements(By.CSS_SELECTOR, "svg.dag g.node")
    rows = d.find_elements(By.CSS_SELECTOR, "#stages tbody tr")
    expect(len(nodes) == len(rows) and len(nodes) >= 5, f"{len(nodes)} graph nodes, {len(rows)} stage rows")
    classes = {n.get_attribute("data-stage"): n.get_attribute("class") for n in nodes}
    expect("st-failed" in classes.get("flaky", ""), f"flaky drawn as {classes.get('flaky')}")
    expect("st-skipped" in classes.get("after", ""), f"after drawn as {classes.get('after')}")
    expect("st-cached" in classes.get("data", ""), f"data drawn as {classes.get('data')}")
    edges = d.find_elements(By.CSS_SELECTOR, "svg.dag path.edge")
    expect(len(edges) >= 5, f"{len(edges)} edges")
    # The failed node is red: the stylesheet applied, not just the class name.
    stroke = d.execute_script(
        "return getComputedStyle(document.querySelector('svg.dag g.st-failed rect')).stroke")
    expect(stroke == "rgb(207, 34, 46)", f"failed node stroke {stroke}")
    # Its boxes do not overlap: every node has its own place.
    boxes = d.execute_script(
        "return Array.from(document.querySelectorAll('svg.dag rect')).map(r => {const b = r.getBoundingClientRect(); return [b.x, b.y]})")
    expect(len({(round(x), round(y)) for x, y in boxes}) == len(boxes), f"overlapping nodes {boxes}")
    shot(d, out, "run")


def check_stage(d, base, out, run, stage):
    d.get(f"{base}/runs/{run}/stages/{seg(stage)}")
    expect(d.find_element(By.TAG_NAME, "h1").text.startswith(stage), d.find_element(By.TAG_NAME, "h1").text)
    outputs = d.find_elements(By.CSS_SELECTOR, "#outputs tbody tr")
    expect(len(outputs) >= 1, "no outputs listed")
    expect(d.find_elements(By.CSS_SELECTOR, "#stage-metrics"), "no metrics table")
    expect(d.find_elements(By.CSS_SELECTOR, "#params"), "no params table")
    text = d.find_element(By.ID, "facts").text
    expect("peak memory" in text and "cache key" in text, text)
    shot(d, out, "stage")


def loaded(d, img):
    """An image's natural width once the browser has finished loading it (0: it failed)."""
    WebDriverWait(d, 10).until(lambda d: d.execute_script("return arguments[0].complete", img))
    return d.execute_script("return arguments[0].naturalWidth", img)


def check_report(d, base, out, run, stage):
    d.get(f"{base}/runs/{run}/reports/{seg(stage)}")
    article = d.find_element(By.ID, "report")
    expect(article.find_elements(By.TAG_NAME, "h1"), "the report has no heading")
    width = loaded(d, article.find_element(By.TAG_NAME, "img"))
    expect(width > 100, f"the report's plot did not load (naturalWidth {width})")
    shot(d, out, "report")


def check_compare(d, base, out, a, b):
    d.get(f"{base}/compare?a={a}&b={b}")
    verdicts = [td.text for td in d.find_elements(By.CSS_SELECTOR, "#cmp-metrics tbody td:last-child")]
    expect(verdicts, "no metric rows")
    expect(d.find_elements(By.CSS_SELECTOR, "#cmp-params tbody tr"), "no param rows")
    shot(d, out, "compare")


def check_curves(d, base, out, a, b, stage):
    d.get(f"{base}/runs/{b}/stages/{seg(stage)}")
    width = loaded(d, d.find_element(By.ID, "curves"))
    expect(width > 100, f"the stage's training curves did not load (naturalWidth {width})")
    d.get(f"{base}/compare?a={a}&b={b}")
    charts = d.find_elements(By.CSS_SELECTOR, f'#cmp-curves img.curves[data-stage="{stage}"]')
    expect(len(charts) == 1, f"{len(charts)} charts of {stage} on the compare page")
    width = loaded(d, charts[0])
    expect(width > 100, f"the compared training curves did not load (naturalWidth {width})")
    shot(d, out, "compare-curves")


def check_live(d, base, out):
    d.get(base + "/live")
    expect(d.find_elements(By.CSS_SELECTOR, "svg.dag g.node"), "no live graph")
    expect(d.find_element(By.ID, "live-status").text == "running", "the page did not open on a running run")
    # A mark on this document: it survives only if the page updates itself rather than reloading.
    d.execute_script("window.__sameDocument = true")
    # The page's script applies server-sent events: wait until the run it shows is over.
    WebDriverWait(d, 120).until(lambda d: d.find_element(By.ID, "live-status").text == "ok")
    expect(d.execute_script("return window.__sameDocument === true"), "the page reloaded instead of applying events")
    link = d.find_element(By.ID, "live-run")
    expect(link.text.startswith("run ") and "/runs/" in link.get_attribute("href"), f"link to the recorded run: {link.text}")
    classes = [n.get_attribute("class") for n in d.find_elements(By.CSS_SELECTOR, "svg.dag g.node")]
    expect(all("st-ran" in c or "st-cached" in c for c in classes), f"live nodes {classes}")
    shot(d, out, "live")


def check_page(d, base, out, name, path):
    """Any page, its first screenful saved as NAME.png (the README's pictures)."""
    d.get(base + path)
    expect(d.find_elements(By.TAG_NAME, "main"), f"{path}: no page")
    expect(not d.find_elements(By.ID, "error"), f"{path}: an error page")
    d.save_screenshot(os.path.join(out, name + ".png"))


def main():
    base, out, checks = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    profile = os.path.join(out, "profile")
    d = browser(profile)
    try:
        for check in checks:
            # page:NAME:PATH keeps the colons of PATH.
            name, *args = check.split(":", 2) if check.startswith("page:") else check.split(":")
            {"runs": check_runs, "run": check_run, "stage": check_stage, "report": check_report,
             "compare": check_compare, "curves": check_curves, "live": check_live, "page": check_page}[name](d, base, out, *args)
            print(f"{check} ok", flush=True)
    finally:
        d.quit()


if __name__ == "__main__":
    main()
