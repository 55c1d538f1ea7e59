"""`vlm search --web` in a real headless browser: Debian's chromium driven by selenium through chromedriver.

The page is served by the real CLI (a subprocess) over an index the real `vlm index` built from the
sample photos and edited copies of them. Set VLM_INDEX_SCREENSHOT=FILE.png to keep a picture of it
(docs/images/search.png is made that way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageOps

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SAMPLES = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "sample"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402 - after the skip: selenium is optional
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _photos(root: Path) -> Path:
    """The sample photos, and for some of them a resized copy, a recompressed copy and a brighter edit."""
    for i, src in enumerate(sorted(SAMPLES.glob("*/*.jpg"))):
        shutil.copy(src, root / src.name)
        if i % 2 == 0:
            with Image.open(src) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.resize((im.width // 2, im.height // 2)).save(root / "edits" / f"{src.stem}-small.jpg", quality=90)
                im.save(root / "edits" / f"{src.stem}-q40.jpg", quality=40)
                ImageEnhance.Brightness(im).enhance(1.15).save(root / "edits" / f"{src.stem}-bright.jpg", quality=92)
    return root


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(home)}
    env.pop("VLM_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def page(clip_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """(the page's URL, the index, the photos), the page served by `vlm search --web` in a subprocess."""
    home = tmp_path_factory.mktemp("index-web")
    photos = home / "photos"
    (photos / "edits").mkdir(parents=True)
    _photos(photos)
    db = home / "index.sqlite"
    subprocess.run(
        [sys.executable, "-m", "vlmcli", "index", str(photos), "--db", str(db), "-m", str(clip_gguf), "-q"],
        env=_env(home),
        check=True,
        timeout=600,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmcli", "search", "--web", "--port", "0", "--db", str(db)],
        env=_env(home),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + proc.stderr.read()
        yield m.group(0), db, photos
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _cli_paths(db: Path, home: Path, *query: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "vlmcli", "search", *query, "--db", str(db), "--paths", "-n", "60"],
        env=_env(home),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return out.splitlines()


def _clear_status(driver) -> None:
    driver.execute_script("document.getElementById('status').textContent = ''")


def _results(driver, wait: WebDriverWait, status: str) -> list[str]:
    """The paths shown once the status line says `status` and every thumbnail has loaded."""
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), status))
    wait.until(lambda d: d.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
    return [e.get_attribute("title") for e in driver.find_elements(By.CSS_SELECTOR, "#results figure img")]


def test_text_and_image_queries_and_duplicates_in_a_real_browser(browser, page) -> None:
    url, db, photos = page
    driver = browser
    wait = WebDriverWait(driver, 60)
    driver.get(url)
    assert driver.title == "vlm search"

    box = driver.find_element(By.ID, "q")
    box.send_keys("a cat on a sofa")
    _clear_status(driver)
    driver.find_element(By.CSS_SELECTOR, "#query button.go").click()
    shown = _results(driver, wait, "results for")
    assert shown == _cli_paths(db, db.parent, "a cat on a sofa")  # the page ranks as the CLI does
    assert len(shown) == len(list(photos.rglob("*.jpg")))

    # An uploaded image: the same file in the index comes first, with score 1.
    probe = photos / "espresso.jpg"
    driver.find_element(By.ID, "q").clear()
    _clear_status(driver)
    driver.find_element(By.ID, "image").send_keys(str(probe))
    shown = _results(driver, wait, "espresso.jpg")
    assert shown[0] == str(probe)
    first_score = driver.find_element(By.CSS_SELECTOR, "#results figure .meta span").text
    assert float(first_score) == pytest.approx(1.0, abs=1e-3)

    # "similar" under a result: an image query by the indexed file.
    _clear_status(driver)
    driver.find_elements(By.CSS_SELECTOR, "#results figure .meta a")[3].click()
    again = _results(driver, wait, f"results for {os.path.basename(shown[3])}")
    assert again[0] == shown[3]

    # The folder filter: only images under it.
    driver.find_element(By.ID, "in").send_keys(str(photos / "edits"))
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a rocket")
    _clear_status(driver)
    driver.find_element(By.CSS_SELECTOR, "#query button.go").click()
    inside = _results(driver, wait, "results for")
    assert inside and all(Path(p).parent == photos / "edits" for p in inside)
    assert len(inside) == len(list((photos / "edits").glob("*.jpg")))
    driver.find_element(By.ID, "in").clear()

    # Duplicates side by side, the keeper marked.
    driver.find_element(By.ID, "tab-dupes").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "dupes-status"), "groups among"))
    groups = driver.find_elements(By.CSS_SELECTOR, "#groups .group")
    api = json.loads(urllib.request.urlopen(url + "api/dupes?threshold=0.95", timeout=60).read())
    assert len(groups) == len(api["groups"]) >= 1
    for g, shown_group in zip(api["groups"], groups):
        kept = shown_group.find_element(By.CSS_SELECTOR, "figure.keep img").get_attribute("title")
        assert kept == g["keeper"]
        assert len(shown_group.find_elements(By.CSS_SELECTOR, "figure")) == len(g["files"])

    # Thumbnails are made once and then served from the cache beside the index.
    thumbs = list(db.with_name(db.name + ".thumbs").rglob("*.jpg"))
    assert len(thumbs) == len({p.read_bytes() for p in photos.rglob("*.jpg")})

    shot = os.environ.get("VLM_INDEX_SCREENSHOT")
    if shot:
        driver.save_screenshot(str(Path(shot).with_name(Path(shot).stem + "-dupes.png")))
        driver.find_element(By.ID, "tab-search").click()
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("a cup of coffee")
        _clear_status(driver)
        driver.find_element(By.CSS_SELECTOR, "#query button.go").click()
        _results(driver, wait, "results for")
        time.sleep(0.5)
        driver.save_screenshot(shot)


def test_the_page_answers_only_local_names_and_serves_only_indexed_files(page) -> None:
    url, _, _ = page
    request = urllib.request.Request(url + "api/search?q=cat", headers={"Host": "attacker.example:80"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "image/" + "0" * 64, timeout=60)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "api/search?q=", timeout=60)
    assert e.value.code == 400 and "the query is empty" in json.loads(e.value.read())["error"]
