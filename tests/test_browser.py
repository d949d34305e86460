"""A real TensorBoard server and the HTML report, opened in headless Chromium (marker ``browser``, run by CI).

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages on file
descriptors 3 and 4, no extra package): console errors, uncaught exceptions and failed loads are collected per page,
screenshots are saved under ``browser_artifacts/`` (look at them).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from conftest import SquaresDataset, collate, tiny_cfg
from xaiwatch.logging import COMMAND_FILE, XaiWriter
from xaiwatch.report import load_run, write_report

pytestmark = pytest.mark.browser

EPOCHS = 11  # steps 0..11: 12 pictures per tag, more than TensorBoard's default of 10
ARTIFACTS = Path(
    os.environ.get("XAIWATCH_BROWSER_ARTIFACTS", Path(__file__).resolve().parents[1] / "browser_artifacts")
)
DASHBOARDS = ("images", "scalars", "text", "custom_scalars", "projector")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("The browser tests need Chromium: `apt-get install -y chromium` (.ci/run installs it when missing).")


class Chromium:
    """Headless Chromium driven by the DevTools protocol over a pipe."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        args = [
            _chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-unsafe-swiftshader",  # WebGL in software, for the PROJECTOR
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._out, self._in, self._buf, self._id, self.events = to_chrome_w, from_chrome_r, b"", 0, []

    def _read(self, timeout: float) -> dict | None:
        if b"\0" not in self._buf:
            if not select.select([self._in], [], [], timeout)[0]:
                return None
            while b"\0" not in self._buf:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        end = time.time() + timeout
        while time.time() < end:
            reply = self._read(max(0.0, end - time.time()))
            if reply is None:
                continue
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def pump(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            event = self._read(max(0.0, end - time.time()))
            if event is not None:
                self.events.append(event)

    def open(self, url: str, width: int = 1400, height: int = 1000, settle: float = 8.0) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            self.send(domain, session=session)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
        first = len(self.events)
        self.send("Page.navigate", {"url": url}, session=session)
        end = time.time() + 60
        while not any(
            e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events[first:]
        ):
            if time.time() > end:
                raise TimeoutError(f"{url} did not load")
            self.pump(0.2)
        self.pump(settle)  # the app fetches its data after the load event
        return Page(self, session, first)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._out)
        os.close(self._in)


class Page:
    def __init__(self, browser: Chromium, session: str, first: int) -> None:
        self.browser, self.session, self.first = browser, session, first

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads of this page."""
        out = []
        for e in self.browser.events[self.first :]:
            if e.get("sessionId") != self.session:
                continue
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(f"exception: {details.get('exception', {}).get('description', details.get('text'))}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                out.append(f"network: {params.get('errorText')}")
        return out

    def evaluate(self, expression: str):
        result = self.browser.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, self.session
        )
        return result["result"].get("value")

    def screenshot(self, path: Path, full: bool = False) -> Path:
        params = {"format": "png"}
        if full:
            size = self.browser.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
            height = min(int(size["height"]), 16000)
            self.browser.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False},
                self.session,
            )
            self.browser.pump(1.0)
        data = self.browser.send("Page.captureScreenshot", params, self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


# ---------------------------------------------------------------------------------------------- the run
class _SetupRun(pl.Callback):
    """What the callbacks do at setup: the CUSTOM SCALARS story and the `tensorboard` command file."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        XaiWriter(trainer.logger.experiment).setup_run(trainer.max_epochs, logdir=Path(trainer.logger.root_dir))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from xaiwatch.callbacks import ErrorAnalysisCallback, ExplainCallback, ProjectionCallback, SaliencyGate
    from xaiwatch.models import YOLOv8Module

    root = tmp_path_factory.mktemp("browser")
    pl.seed_everything(0)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)
    callbacks = [
        _SetupRun(),
        ExplainCallback(methods=["saliency"], num_probe=1, on_error="raise"),
        SaliencyGate(num_probe=2, mode="warn", on_error="raise"),
        ProjectionCallback(layers=["neck.p3"], method="pca", on_error="raise"),
        ErrorAnalysisCallback(max_images=4, batch_size=4, conf=0.01, explain_top_k=1, on_error="raise"),
    ]
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=1,
        logger=TensorBoardLogger(str(root), name="tb"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        accelerator="cpu",
    )
    train = DataLoader(SquaresDataset(8, 0), batch_size=8, collate_fn=collate)
    val = DataLoader(SquaresDataset(4, 1), batch_size=4, collate_fn=collate)
    trainer.fit(module, train, val)
    return Path(trainer.logger.root_dir), Path(trainer.logger.log_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(run, tmp_path_factory):
    root, run_dir = run
    command = shlex.split((run_dir / COMMAND_FILE).read_text())
    assert command[:2] == ["tensorboard", "--logdir"] and Path(command[2]) == root.resolve()
    binary = Path(sys.executable).with_name("tensorboard")
    port = _free_port()
    log = tmp_path_factory.mktemp("tb_server") / "tensorboard.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(
            [str(binary), *command[1:], "--host", "127.0.0.1", "--port", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 90
        while True:
            try:
                _get(base + "/data/environment")
                break
            except OSError:
                if time.time() > end or server.poll() is not None:
                    pytest.fail(f"tensorboard did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, run_dir.relative_to(root).as_posix()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome = Chromium(tmp_path_factory.mktemp("chromium_profile"))
    yield chrome
    chrome.close()


# ---------------------------------------------------------------------------------------------- tests
def test_tensorboard_keeps_every_step_of_every_picture(run, tensorboard):
    base, name = tensorboard
    expected = {tag: [e[0] for e in events] for tag, events in load_run(run[1]).images.items()}
    assert any(t.startswith("explain/") for t in expected) and any(t.startswith("projection/") for t in expected)
    listed = _get(base + "/data/plugin/images/tags")[name]
    assert set(listed) == set(expected)
    for tag, steps in expected.items():
        query = urllib.parse.urlencode({"tag": tag, "run": name})
        served = [e["step"] for e in _get(f"{base}/data/plugin/images/images?{query}")]
        assert served == steps, tag
        if not tag.startswith("explain_filmstrip/"):
            assert served[0] == 0 or tag.startswith(("saliency", "errors", "projection")), tag
    for tag in (t for t in expected if t.startswith("explain/")):
        assert expected[tag] == list(range(EPOCHS + 1))  # step 0 (before training) and 11 more: > 10 kept


_DEEP_INPUTS = """(() => {
  const out = [];
  const walk = (root) => {
    root.querySelectorAll('*').forEach((el) => {
      if ((el.tagName === 'INPUT' || el.tagName === 'PAPER-INPUT') && el.value) out.push(el.value);
      if (el.shadowRoot) walk(el.shadowRoot);
      if (el.tagName === 'IFRAME' && el.contentDocument) walk(el.contentDocument);
    });
  };
  walk(document);
  return out;
})()"""


def test_tensorboard_dashboards_load_without_errors(tensorboard, browser):
    base, _ = tensorboard
    for dashboard in DASHBOARDS:
        page = browser.open(f"{base}/#{dashboard}", settle=10.0)
        shot = page.screenshot(ARTIFACTS / f"tensorboard_{dashboard}.png")
        assert shot.stat().st_size > 10_000
        assert page.errors() == [], dashboard
        if dashboard == "projector":  # it opens on the last epoch
            assert f"projection/neck.p3 (last: step {EPOCHS})" in page.evaluate(_DEEP_INPUTS)


def test_report_opens_with_every_picture_loaded(run, browser, tmp_path):
    report = write_report(run[0], tmp_path / "report.html")
    html = report.read_text()
    page = browser.open(report.as_uri(), settle=3.0)
    count = page.evaluate("document.images.length")
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert count == html.count("<img ") and count > 20
    assert broken == 0
    assert page.errors() == []
    page.screenshot(ARTIFACTS / "report_top.png")
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    page.screenshot(ARTIFACTS / "report_full.png", full=True)
    shutil.copy(report, ARTIFACTS / "report.html")
