"""A web page for trying any vocabulary on any image: a Gradio app on top of `models.predictor.Predictor`.

    python demo.py --serve                          # the bundled miniature model, http://127.0.0.1:7860
    python demo.py --serve --resume ckpt.pth --lvis_json lvis_v1_val.json --port 8000
    python demo_web.py --screenshot assets/web_demo.png   # the page after a detection, in headless Chromium

The page takes one or more images (uploaded, or a bundled example), a comma-separated vocabulary (or
the COCO / LVIS / toy-world presets), a score threshold and a number of detections per image, and
shows the annotated images, a table of the detections and a `detections.json` to download (the rows
`demo.py` writes). The model loads once; text embeddings go through the Predictor's disk cache.
Problems with a request (a file that is not an image, an empty vocabulary, an image too small, a
class name longer than the model's text encoder reads) are reported in the page and the server goes
on serving. By default the server listens on the loopback interface only; nothing is sent anywhere
(Gradio's analytics and Hugging Face telemetry are off, the theme's fonts are served locally).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from demo_inputs import (
    IMAGE_EXTENSIONS,
    ROOT,
    SAMPLES_DIR,
    TOY_CHECKPOINT,
    TOY_CLIP,
    TOY_PROMPT,
    TOY_SAMPLES_DIR,
    DemoError,
    choose_vocabulary,
    collect_inputs,
    detection_rows,
    lvis_vocabulary,
    resolve_checkpoint,
    toy_vocabulary,
)
from util.visualize import annotate

# A side shorter than this is refused (the CLIP ResNet downsamples by 32; such a picture holds nothing to find).
MIN_IMAGE_SIDE = 32
CUSTOM = "custom"
TOY_PRESET = "toy world (16)"
COCO_PRESET = "COCO (65)"
LVIS_PRESET = "LVIS"
TABLE_HEADERS = ["image", "name", "score", "box (x0, y0, x1, y1)"]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless Chromium as root, offline: no sandbox, no GPU, no background traffic.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1800")


def offline_environment() -> None:
    """Before gradio and huggingface_hub are imported: no analytics, no version check, no telemetry."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class RequestError(Exception):
    """A problem with one request, shown in the page."""


# ------------------------------------------------------------------ vocabulary
class Vocabularies:
    """The presets the page offers: name -> (class names, category ids or None, boosted indices or None)."""

    def __init__(self, *, toy: bool, lvis_json: str = ""):
        self.presets: dict[str, tuple[list[str], list[int] | None, list[int] | None]] = {}
        if toy:
            self.presets[TOY_PRESET] = toy_vocabulary()
        self.presets[COCO_PRESET] = choose_vocabulary(
            argparse.Namespace(vocabulary="coco", custom_vocabulary=None, lvis_json=""))
        if lvis_json:
            names, ids, rare = lvis_vocabulary(lvis_json)
            self.presets[f"{LVIS_PRESET} ({len(names)})"] = (names, ids, rare)

    def text(self, preset: str) -> str:
        return ", ".join(self.presets[preset][0])

    def parse(self, text: str) -> tuple[list[str], list[int] | None, list[int] | None]:
        """The typed vocabulary; a preset's category ids and boosted classes when it is exactly a preset."""
        text = (text or "").strip()
        if not text.replace(",", "").strip():
            raise RequestError("The vocabulary is empty: type at least one class name (names separated by commas, "
                               "e.g. \"cat, remote control\"), or pick a preset.")
        try:
            names, _, _ = choose_vocabulary(argparse.Namespace(vocabulary="custom", custom_vocabulary=text,
                                                               lvis_json=""))
        except DemoError as e:
            raise RequestError(f"Vocabulary: {e}") from e
        for preset_names, ids, boosted in self.presets.values():
            if names == preset_names:
                return names, ids, boosted
        return names, None, None


# ------------------------------------------------------------------ requests
def _paths(files) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    return [Path(getattr(f, "name", f)) for f in files]


class Detector:
    """One request: images + vocabulary -> (gallery, table rows, json path, status). One at a time."""

    def __init__(self, predictor, vocabularies: Vocabularies, workdir: Path):
        self.predictor = predictor
        self.vocabularies = vocabularies
        self.workdir = workdir
        self.lock = threading.Lock()
        self.count = 0

    def vocabulary(self, text: str):
        names, ids, boosted = self.vocabularies.parse(text)
        cut = self.predictor.truncated_names(names)
        if cut:
            classifier = self.predictor.model.classifier
            shown = ", ".join(f"'{n}' ({classifier.prompt_length(n)} tokens)" for n in cut)
            raise RequestError(f"Too long for this model's text encoder, which reads {classifier.text_len} tokens per "
                               f"prompt (e.g. \"a photo of a {{name}}.\"), so it would cut: {shown}. Use shorter "
                               f"class names.")
        return names, ids, boosted

    def load(self, path: Path):
        from models.predictor import load_rgb

        try:
            image = load_rgb(path)
        except (OSError, ValueError) as e:
            raise RequestError(f"{path.name}: not an image that can be read ({type(e).__name__}).") from e
        if min(image.size) < MIN_IMAGE_SIDE:
            raise RequestError(f"{path.name}: {image.size[0]}x{image.size[1]} pixels is too small; "
                               f"the detector needs at least {MIN_IMAGE_SIDE} pixels per side.")
        return image

    def __call__(self, files, text: str, threshold: float, max_detections):
        import numpy as np

        paths = _paths(files)
        if not paths:
            raise RequestError("No image: upload one or more images, or pick a bundled example.")
        try:
            threshold = float(threshold)
            max_detections = int(max_detections)
        except (TypeError, ValueError) as e:
            raise RequestError("The score threshold and the number of detections must be numbers.") from e
        if not 0.0 <= threshold <= 1.0:
            raise RequestError(f"Score threshold {threshold}: expected a value in [0, 1].")
        if max_detections < 1:
            raise RequestError(f"Max detections {max_detections}: expected a positive number.")
        names, category_ids, boosted = self.vocabulary(text)
        gallery, table, rows, problems = [], [], [], []
        with self.lock:  # a Predictor must not be used from several threads at once
            for index, path in enumerate(paths):
                try:
                    image = self.load(path)
                    try:
                        [dets] = self.predictor.predict(np.asarray(image), names, score_threshold=threshold,
                                                        max_detections=max_detections, novel_indices=boosted)
                    except ValueError as e:  # e.g. an image too thin for the CLIP trunk
                        raise RequestError(f"{path.name}: {e}") from e
                except RequestError as e:
                    problems.append(str(e))
                    continue
                drawn, _ = annotate(image, dets.boxes, dets.labels.tolist(), dets.names, dets.scores.tolist())
                gallery.append((drawn, f"{path.name}: {len(dets)} detection(s)"))
                image_rows = detection_rows(dets, image_id=index, file_name=path.name, category_ids=category_ids)
                rows.extend(image_rows)
                table.extend([r["file_name"], r["category_name"], round(r["score"], 3),
                              str([round(v, 1) for v in box])]
                             for r, box in zip(image_rows, dets.boxes.tolist()))
            self.count += 1
            target = self.workdir / f"request_{self.count}" / "detections.json"
        if not gallery:
            raise RequestError(" ".join(problems))
        target.parent.mkdir(parents=True)
        with open(target, "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # as demo.py writes it
        done = len(gallery)
        status = (f"{done} image(s), {len(rows)} detection(s) scoring at least {threshold:g} with "
                  f"{len(names)} class name(s).")
        if problems:
            status += " Skipped: " + " ".join(problems)
        return gallery, table, str(target), status, problems


# ------------------------------------------------------------------ the page
def example_images(toy: bool, inputs: Sequence[str] | None = None) -> list[Path]:
    if inputs:
        return collect_inputs(inputs)
    folder = TOY_SAMPLES_DIR if toy else SAMPLES_DIR
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def build_app(predictor, *, toy: bool = False, vocabulary: str = "", lvis_json: str = "",
              examples: Sequence[str | os.PathLike] | None = None, score_threshold: float = 0.2,
              max_detections: int = 100, title: str = "", workdir: str | os.PathLike | None = None):
    """The page (a `gr.Blocks`) for `predictor`.

    toy: the bundled miniature model (toy-world preset and prefilled vocabulary, toy examples);
    vocabulary: the textbox's initial text (default: the toy world's 16 names, else the COCO-OVD 65);
    lvis_json: an LVIS json, for the LVIS preset; examples: image files offered as examples
    (default `assets/toy/samples/` for the toy model, else `assets/samples/`); workdir: where the
    detections.json files are written (default: a temporary folder removed at exit).
    """
    offline_environment()
    import gradio as gr

    vocabularies = Vocabularies(toy=toy, lvis_json=lvis_json)
    default_preset = TOY_PRESET if toy else COCO_PRESET
    if vocabulary:
        text, preset = vocabulary, CUSTOM
    else:
        text, preset = vocabularies.text(default_preset), default_preset
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="cora_web_")
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    detector = Detector(predictor, vocabularies, Path(workdir))
    examples = [Path(p) for p in (examples if examples is not None else example_images(toy))]

    def run(files, text, threshold, max_dets):
        try:
            gallery, table, target, status, problems = detector(files, text, threshold, max_dets)
        except RequestError as e:
            gr.Warning(str(e))
            return [], [], None, f"**Error:** {e}"
        except Exception as e:  # noqa: BLE001  the server keeps serving whatever one request does
            print(f"demo_web: request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            gr.Warning(f"The detector failed on this request: {type(e).__name__}: {e}")
            return [], [], None, f"**Error:** the detector failed on this request ({type(e).__name__}: {e})"
        if problems:
            gr.Warning(" ".join(problems))
        return gallery, table, target, status

    # uploads and results in gradio's cache are deleted after a day
    with gr.Blocks(title="CORA open-vocabulary detection", analytics_enabled=False,
                   delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(f"## CORA: open-vocabulary detection\n{title}")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=list(IMAGE_EXTENSIONS),
                                elem_id="images")
                if examples:
                    gr.Examples(examples=[[[str(p)]] for p in examples], inputs=[files],
                                example_labels=[p.name for p in examples], label="Bundled examples")
                vocab = gr.Textbox(value=text, lines=3, elem_id="vocabulary",
                                   label="Vocabulary: class names separated by commas")
                presets = gr.Radio([CUSTOM, *vocabularies.presets], value=preset, label="Vocabulary preset",
                                   elem_id="preset")
                with gr.Row():
                    threshold = gr.Slider(0.0, 1.0, value=score_threshold, step=0.01, label="Score threshold",
                                          elem_id="threshold")
                    max_dets = gr.Number(value=max_detections, precision=0, minimum=1,
                                         label="Max detections per image", elem_id="max_detections")
                button = gr.Button("Detect", variant="primary", elem_id="detect")
            with gr.Column(scale=1):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Detections", format="png", columns=2, height="auto",
                                     object_fit="contain", elem_id="gallery")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "number", "str"],
                                     interactive=False, elem_id="table", label="Detections")
                download = gr.File(label="detections.json (COCO results style)", elem_id="json",
                                   interactive=False)

        presets.change(lambda p: gr.update() if p == CUSTOM else vocabularies.text(p), presets, vocab)
        vocab.input(None, None, presets, js=f"() => {json.dumps(CUSTOM)}")  # typing: back to custom, in the browser
        button.click(run, [files, vocab, threshold, max_dets], [gallery, table, download, status],
                     concurrency_limit=1)
    app.cora_examples = examples  # what launch() must allow to be served
    return app


def model_title(checkpoint: Path, toy: bool, predictor) -> str:
    if toy:
        from tools.toy.world import NOVEL_NAMES

        return (f"The bundled miniature model (`{checkpoint.relative_to(ROOT)}`), trained on toy shapes: "
                f"no annotated box showed it the novel classes {', '.join(NOVEL_NAMES)} (CORA+: only its own "
                f"pseudo boxes). Any name works; pass "
                f"`--resume` a published CORA checkpoint for photos. Device: {predictor.device}.")
    return f"Checkpoint `{checkpoint}`, device {predictor.device}."


def serve(args) -> int:
    """`python demo.py --serve`: load the model once and serve the page until interrupted."""
    import ipaddress

    offline_environment()
    checkpoint, toy = resolve_checkpoint(args.resume, toy_allowed=True)
    if not 0 <= args.port <= 65535:
        raise DemoError(f"--port {args.port}: expected a port number")
    if args.vocabulary == "lvis" and not args.lvis_json:
        lvis_vocabulary("")  # the message saying what is missing
    if args.lvis_json:
        lvis_vocabulary(args.lvis_json)  # a bad file stops here, not in the page
    examples = example_images(toy, args.input)
    if toy:
        print(f"no CORA checkpoint given: serving the bundled miniature model {checkpoint.relative_to(ROOT)} "
              f"(pass --resume for a published checkpoint)", flush=True)
    from models.predictor import Predictor

    device = "cpu" if args.cpu else (args.device or None)
    predictor = Predictor.from_checkpoint(
        checkpoint, clip_archive=args.model_path or (TOY_CLIP if toy else None),
        region_prompt=args.region_prompt_path or (TOY_PROMPT if toy else None), device=device,
        cache_dir=args.text_cache_dir or None, disk_cache=not args.no_text_cache, precision=args.precision)
    app = build_app(predictor, toy=toy, vocabulary=args.custom_vocabulary or "", lvis_json=args.lvis_json,
                    examples=examples, score_threshold=args.confidence_threshold,
                    max_detections=args.max_detections, title=model_title(checkpoint, toy, predictor))
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"demo_web: serving on {args.host}: the page is reachable from other machines", file=sys.stderr)
    launch(app, host=args.host, port=args.port)
    return 0


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    import gradio as gr

    app.queue(default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                      mcp_server=False, show_error=False, prevent_thread_lock=not block,
                      allowed_paths=sorted({str(p.resolve().parent) for p in app.cora_examples}),
                      footer_links=[], theme=gr.themes.Default(), max_file_size="50mb")


# ------------------------------------------------------------------ the screenshot
def chromium(user_data_dir: str | os.PathLike, *, log_network: bool = False, extra: Sequence[str] = ()):
    """Selenium's Chrome driver on Debian's chromium + chromium-driver, headless and offline.
    log_network: keep DevTools' network events (`driver.get_log("performance")`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *extra):
        options.add_argument(flag)
    if log_network:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def screenshot(path: str, *, port: int = 0) -> None:
    """Serve the bundled toy model, detect on a toy scene in headless Chromium, save the page as PNG."""
    offline_environment()
    import socket
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from models.predictor import Predictor

    checkpoint, toy = TOY_CHECKPOINT, True
    predictor = Predictor.from_checkpoint(checkpoint, clip_archive=TOY_CLIP, region_prompt=TOY_PROMPT)
    app = build_app(predictor, toy=toy, title=model_title(checkpoint, toy, predictor))
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    launch(app, port=port, block=False)
    images = example_images(toy)
    image = next((p for p in images if p.name == "000000000002.jpg"), images[0])  # a novel class among its finds
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(profile)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 300)
            upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"))
            upload.send_keys(str(image))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#images a[download="{image.name}"]'))
            driver.find_element(By.ID, "detect").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img") and "detection(s) scoring" in
                       d.find_element(By.CSS_SELECTOR, "#status [data-testid=markdown]").text)
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1400, max(900, min(int(height) + 40, 2400)))
            time.sleep(1)  # let the page lay itself out again
            bottom = driver.execute_script("return document.getElementById('json').getBoundingClientRect().bottom")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
            from PIL import Image

            with Image.open(path) as shot:  # down to the last component
                shot.crop((0, 0, shot.width, min(shot.height, int(bottom) + 24))).save(path, optimize=True)
        finally:
            driver.quit()
            app.close()
    print(f"demo_web: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The CORA web page (serve it with `python demo.py --serve`).")
    p.add_argument("--screenshot", metavar="PNG", required=True,
                   help="serve the bundled toy model, run it on a toy scene in headless Chromium, save the page")
    args = p.parse_args(argv)
    screenshot(args.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
