"""The web page (`python demo.py --serve`, demo_web.py) in a real headless browser.

The server runs as users start it (a subprocess serving the bundled toy model on a free loopback
port); Debian's chromium, driven by selenium through Debian's chromedriver, uploads toy scenes, types
a vocabulary with a novel class, and reads back the page and its detections.json, which must be what
`Predictor.predict` gives for the same image, vocabulary and threshold. Bad requests (a text file
named .png, an empty vocabulary, a name the text encoder would cut) must show a message in the page
while the server keeps serving. Every request the browser makes must stay on the loopback server.

    python -m pytest -q tests/test_web_demo.py
    python demo_web.py --screenshot assets/web_demo.png     # the README's picture

Waits are hang guards only (minutes), polling for the condition.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import demo
import demo_web
from datasets.coco_ovd import COCO_OVD_CATEGORY_IDS
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parent.parent
SCENE = demo.TOY_SAMPLES_DIR / "000000000002.jpg"
SECOND = demo.TOY_SAMPLES_DIR / "000000000008.jpg"
# "lightning" is a novel class of the toy world: no annotated box of it was in the bundled model's training.
VOCABULARY = ["flower", "lightning", "diamond", "square", "crescent"]
LONG_NAME = "big red spotted heart with a golden border"

needs_chromium = pytest.mark.skipif(
    not (os.path.exists(demo_web.CHROMIUM) and os.path.exists(demo_web.CHROMEDRIVER)),
    reason=f"no {demo_web.CHROMIUM} / {demo_web.CHROMEDRIVER}: apt-get install chromium chromium-driver "
           f"(.ci/run installs them)")


@pytest.fixture(scope="module")
def predictor():
    from models.predictor import Predictor

    return Predictor.from_checkpoint(demo.TOY_CHECKPOINT, clip_archive=demo.TOY_CLIP,
                                     region_prompt=demo.TOY_PROMPT, device="cpu", disk_cache=False)


def expected_rows(predictor, paths, vocabulary, threshold):
    rows = []
    for index, path in enumerate(paths):
        [dets] = predictor.predict(str(path), vocabulary, score_threshold=threshold)
        rows.extend(demo.detection_rows(dets, image_id=index, file_name=path.name, category_ids=None))
    return rows


def assert_same_rows(got, expected):
    """Equal up to float noise between two processes (thread counts): boxes to _result_rows' rounding."""
    assert [(r["image_id"], r["file_name"], r["category_name"]) for r in got] == \
        [(r["image_id"], r["file_name"], r["category_name"]) for r in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        assert g["score"] == pytest.approx(e["score"], abs=2e-6)
        assert g["bbox"] == pytest.approx(e["bbox"], abs=2e-3)


# ------------------------------------------------------------------ without a browser
def test_truncated_names_agree_with_the_text_encoder(predictor):
    from open_clip.tokenizer import SimpleTokenizer

    from models.clip import PROMPT_TEMPLATES

    classifier = predictor.model.classifier
    assert classifier.text_len == 15  # the toy model's --text_len
    full = SimpleTokenizer()
    names = ["heart", "lightning", "hot air balloon", "big red heart", "red spotted heart shape", LONG_NAME,
             "t-shirt.", "(heart)", "heart!!!", "a.b.c", "!!!!!!!!!!!!", "rock'n'roll star"]
    for name in names:
        prompts = [t.format(name) for t in PROMPT_TEMPLATES]
        lengths = (full(prompts, context_length=77) != 0).sum(dim=1)
        cut = bool((lengths > classifier.text_len).any())
        if not cut:  # what the model reads is the whole prompt
            assert (classifier.tokenize(prompts) == full(prompts, context_length=77)[:, :classifier.text_len]).all()
        assert (name in predictor.truncated_names([name])) == cut, name
    assert predictor.truncated_names(["heart", "lightning"]) == []
    assert predictor.truncated_names([LONG_NAME]) == [LONG_NAME]


def test_request_errors_are_messages(predictor, tmp_path):
    vocabularies = demo_web.Vocabularies(toy=True)
    detector = demo_web.Detector(predictor, vocabularies, tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (20, 300)).save(tiny)
    cases = [([str(text)], "heart", "notes.png: not an image"),
             ([str(SCENE)], " , ,", "vocabulary is empty"),
             ([str(SCENE)], f"heart, {LONG_NAME}", f"would cut: '{LONG_NAME}'"),
             ([str(tiny)], "heart", "20x300 pixels is too small"),
             ([], "heart", "No image")]
    for files, vocabulary, message in cases:
        with pytest.raises(demo_web.RequestError, match=message):
            detector(files, vocabulary, 0.2, 100)
    # presets: exactly the toy world's names carry its category ids
    names, ids, _ = vocabularies.parse(vocabularies.text(demo_web.TOY_PRESET))
    assert len(names) == 16 and ids == list(range(1, 17))
    assert vocabularies.parse("heart, Heart ,star") == (["heart", "star"], None, None)
    gallery, table, target, status, problems = detector([str(SCENE), str(text)], ", ".join(VOCABULARY), 0.2, 100)
    assert len(gallery) == 1 and problems and "1 image(s)" in status and "Skipped: notes.png" in status
    assert_same_rows(json.loads(Path(target).read_text()), expected_rows(predictor, [SCENE], VOCABULARY, 0.2))
    assert [row[1] for row in table] == [r["category_name"] for r in json.loads(Path(target).read_text())]


def test_presets(tmp_path):
    lvis = tmp_path / "lvis.json"
    lvis.write_text(json.dumps({"categories": [{"id": 3, "name": "hot_dog", "frequency": "f"},
                                               {"id": 1, "name": "aerosol_can", "frequency": "r"},
                                               {"id": 7, "name": "zebra", "frequency": "r"}]}))
    vocabularies = demo_web.Vocabularies(toy=False, lvis_json=str(lvis))
    assert list(vocabularies.presets) == [demo_web.COCO_PRESET, "LVIS (3)"]
    assert vocabularies.parse(vocabularies.text("LVIS (3)")) == (["aerosol can", "hot dog", "zebra"], [1, 3, 7], [0, 2])
    coco_names, coco_ids, _ = vocabularies.parse(vocabularies.text(demo_web.COCO_PRESET))
    assert len(coco_names) == 65 and coco_ids == list(COCO_OVD_CATEGORY_IDS)
    assert vocabularies.parse(", ".join(coco_names[:-1]))[1] is None  # edited: no longer the benchmark's list


# ------------------------------------------------------------------ in the browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python demo.py --serve --port P` with the bundled toy model; yields (url, process, log path)."""
    work = tmp_path_factory.mktemp("web")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != demo.CHECKPOINT_ENV}
    env.update(PYTHONPATH=str(ROOT), CORA_CACHE_DIR=str(work / "cora_cache"), GRADIO_TEMP_DIR=str(work / "gradio"))
    command = [sys.executable, str(ROOT / "demo.py"), "--serve", "--port", str(port), "--cpu"]  # as `predictor`
    if demo.DEFAULT_CHECKPOINT.is_file():  # a CORA checkpoint would be served: name the toy model explicitly
        command += ["--resume", str(demo.TOY_CHECKPOINT), "--model_path", str(demo.TOY_CLIP),
                    "--region_prompt_path", str(demo.TOY_PROMPT)]
    log = work / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {HANG_GUARD_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Page:
    """The page in headless Chromium, with the few actions the tests need."""

    def __init__(self, driver, url):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.by = driver, url, By
        # the page re-renders while it is polled: an element found may be gone a moment later
        self.wait = WebDriverWait(driver, HANG_GUARD_S, poll_frequency=0.2,
                                  ignored_exceptions=(StaleElementReferenceException,))
        driver.get(url)
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))

    def text(self, elem_id: str) -> str:
        return self.driver.execute_script(f"return document.getElementById('{elem_id}').innerText") or ""

    def status(self) -> str:
        """The status line (the Markdown's text, without the progress timer shown while a request runs)."""
        return self.driver.execute_script(
            "const m = document.querySelector('#status [data-testid=markdown]'); return m ? m.innerText : ''") or ""

    def downloads(self, elem_id: str) -> list[str]:
        """The file names a File component offers (its download links)."""
        return self.driver.execute_script(
            f"return Array.from(document.querySelectorAll('#{elem_id} a[download]'), a => a.getAttribute('download'))")

    def gallery_images(self) -> int:
        return self.driver.execute_script("return document.querySelectorAll('#gallery img').length")

    def idle(self) -> bool:
        return not self.driver.find_elements(self.by.CSS_SELECTOR, "[data-testid=status-tracker]:not(.hide)")

    def upload(self, *paths: Path) -> None:
        By = self.by

        def clear(driver):
            for button in driver.find_elements(By.CSS_SELECTOR, "#images button[aria-label=Clear]"):
                button.click()
            return True

        self.wait.until(clear)
        self.wait.until(lambda d: not self.downloads("images"))
        self.driver.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(
            "\n".join(str(p) for p in paths))
        self.wait.until(lambda d: sorted(self.downloads("images")) == sorted(p.name for p in paths))

    def fill(self, selector: str, value: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.driver.find_element(self.by.CSS_SELECTOR, selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        if value:
            field.send_keys(value)
        field.send_keys(Keys.TAB)
        self.wait.until(lambda d: d.find_element(self.by.CSS_SELECTOR, selector).get_attribute("value") == value)

    def detect(self) -> str:
        """Click Detect; the status once it changed (each request's status differs from the one before)."""
        before = self.status()
        self.driver.find_element(self.by.ID, "detect").click()
        self.wait.until(lambda d: self.status().strip() and self.status() != before and self.idle())
        return self.status()

    def table(self) -> list[list[str]]:
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#table [role=row].virtual-row'), row => "
            "Array.from(row.querySelectorAll('[role=gridcell]'), cell => cell.innerText.trim()))")

    def json_rows(self) -> list[dict]:
        assert self.downloads("json") == ["detections.json"]
        href = self.driver.execute_script("return document.querySelector('#json a[download]').href")
        with urllib.request.urlopen(href, timeout=60) as response:
            return json.loads(response.read())

    def requests(self) -> list[str]:
        """Every URL the browser asked for (DevTools' network log)."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
            elif message["method"] == "Network.webSocketCreated":
                urls.append(message["params"]["url"])
        return urls


@needs_chromium
@pytest.mark.slow
def test_the_page_in_a_browser(server, predictor, tmp_path):
    url, process, log = server
    driver = demo_web.chromium(tmp_path / "profile", log_network=True)
    seen = []
    try:
        page = Page(driver, url)
        # a toy scene, typed names with a novel one, the default threshold (0.2)
        page.upload(SCENE)
        page.fill("#vocabulary textarea", ", ".join(VOCABULARY))
        # typing leaves the toy-world preset
        page.wait.until(lambda d: d.find_element(page.by.CSS_SELECTOR, "#preset input:checked").get_attribute(
            "value") == demo_web.CUSTOM)
        status = page.detect()
        expected = expected_rows(predictor, [SCENE], VOCABULARY, 0.2)
        assert "lightning" in [r["category_name"] for r in expected], "the novel class should be found"
        assert status.startswith(f"1 image(s), {len(expected)} detection(s) scoring at least 0.2 with 5 class name(s)")
        assert [row[:2] for row in page.table()] == [[SCENE.name, r["category_name"]] for r in expected]
        assert [float(row[2]) for row in page.table()] == pytest.approx([r["score"] for r in expected], abs=6e-4)
        assert_same_rows(page.json_rows(), expected)
        assert page.gallery_images() == 1 and f"{SCENE.name}: {len(expected)} detection(s)" in page.text("gallery")
        driver.save_screenshot(str(tmp_path / "web_demo.png"))

        # bad requests: a message in the page, no traceback
        fake = tmp_path / "holiday.png"
        fake.write_text("this is a text file, not a picture")
        page.upload(fake)
        status = page.detect()
        assert "holiday.png: not an image that can be read" in status and "Traceback" not in status
        assert page.table() == [] and page.gallery_images() == 0
        page.upload(SCENE)
        page.fill("#vocabulary textarea", "")
        status = page.detect()
        assert "The vocabulary is empty" in status
        page.fill("#vocabulary textarea", f"heart, {LONG_NAME}")
        status = page.detect()
        assert f"would cut: '{LONG_NAME}'" in status and "reads 15 tokens" in status

        # the server still serves: two scenes, a threshold typed into the slider's box
        page.upload(SCENE, SECOND)
        page.fill("#vocabulary textarea", ", ".join(VOCABULARY))
        page.fill("#threshold input[type=number]", "0.15")
        status = page.detect()
        expected = expected_rows(predictor, [SCENE, SECOND], VOCABULARY, 0.15)
        assert status.startswith(f"2 image(s), {len(expected)} detection(s) scoring at least 0.15")
        assert sorted(row[1] for row in page.table()) == sorted(r["category_name"] for r in expected)
        assert_same_rows(page.json_rows(), expected)
        assert page.gallery_images() == 2
        # a bundled example fills the image box
        driver.find_element(page.by.XPATH, f"//button[contains(., '{SECOND.name}')]").click()
        page.wait.until(lambda d: page.downloads("images") == [SECOND.name])
        seen = page.requests()
    finally:
        driver.quit()
    assert process.poll() is None, "the server must keep serving"
    assert "Traceback" not in log.read_text(), log.read_text()
    # nothing is fetched from anywhere but the server (fonts, scripts, analytics)
    web = [u for u in seen if u.startswith(("http:", "https:", "ws:", "wss:"))]
    outside = [u for u in web if not u.startswith(url)]
    assert web and not outside, outside


def test_serve_flags():
    args = demo.get_parser().parse_args(["--serve"])
    assert args.serve and args.port == 7860 and args.host == "127.0.0.1"
    args = demo.get_parser().parse_args(["--serve", "--port", "8000", "--host", "0.0.0.0"])
    assert (args.port, args.host) == (8000, "0.0.0.0")


def test_serve_passes_the_precision_to_the_predictor(monkeypatch):
    """`demo.py --serve --precision bf16` builds the page's Predictor in bf16 (the flag demo.py documents)."""
    from models.predictor import Predictor

    seen = {}

    class Stop(Exception):
        pass

    def from_checkpoint(checkpoint, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(Predictor, "from_checkpoint", from_checkpoint)
    with pytest.raises(Stop):
        demo_web.serve(demo.get_parser().parse_args(["--serve", "--precision", "bf16", "--cpu"]))
    assert seen["precision"] == "bf16" and seen["device"] == "cpu"
