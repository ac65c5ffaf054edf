"""The pack in a real ComfyUI (issue 16, part 10), skipped unless COMFYUI_DIR is set.

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest -q tests/test_real_host.py

COMFYUI_DIR is a ComfyUI checkout whose requirements are installed in COMFYUI_PYTHON (default: the
Python running the tests). The test starts `python main.py --cpu --listen 127.0.0.1 --port <free>`
with `--base-directory` a temporary folder whose custom_nodes holds a symlink to this pack, so the
run writes nothing into the checkout (models, outputs, user settings) and no other pack loads; the
folder, the link in it and the server go when the test ends. It waits for /object_info to list the
pack's nodes, converts the shipped tiny workflow from the UI format to the API format with the
server's own node definitions, queues it as a client with a websocket open, follows it to the end
(/history is the judge), and checks the files written, the live messages that reached the client,
and the server's log (no import failure, traceback, unloaded LoRA key or missing embedding).

COMFYUI_SD15=1 also runs the two SD workflows on a random SD-1.5-shaped single file the engine makes
(about 2 GB on disk and some 10 GB of memory; costs lowered to a few minutes on a CPU): the learning
one, then the reuse one on the bundle it saved, whose LoRA and embeddings go through ComfyUI's own
loaders.

COMFYUI_SDXL=1 runs the shipped SDXL workflow (issue 19) on a random single file of SDXL base 1.0's
real shapes that the engine makes (7 GB on disk in fp16): ComfyUI recognises SDXL only by its real
widths and depths (model_channels 320, transformer depths 0/0/2/2/10/10, context 2048) and builds
CLIP-L / bigG at their real sizes, so a small SDXL-shaped file is refused ("Could not detect model
type"). Costs are lowered (64 px, two steps each). The engine's copy is float32 on the CPU (14 GB), so
this server holds ComfyUI's U-Net and text encoders in fp8 (--fp8_e4m3fn-unet --fp8_e4m3fn-text-enc);
even so ComfyUI's process peaks near 19 GB (18.7 GB measured, docs/comfyui_host_check.md): give it
about 20 GB of free memory and run it on its own (-k sdxl). Then the bundle is exported and
a second server (fp8 U-Net, default text encoders) runs a core-only graph, Load LoRA + CLIP Text
Encode with the embeddings + KSampler, with no unloaded LoRA key and no ignored embedding in its log.

With Playwright for Python installed and a Chromium (CHROMIUM, else `chromium` on the PATH; the
system's browser, nothing is downloaded), the real front end is also driven: each shipped workflow
loads with no missing node and no overlapping nodes, the pack's script raises no error in the
browser, and a queued tiny workflow whose DenseCRF is set to wipe out its concepts shows the
pack's warning as a toast.

Without COMFYUI_DIR only the parts that need no ComfyUI run: the UI-to-API conversion against node
definitions shaped as /object_info gives them, and the websocket client against a local server.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK / "workflows"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
TIMEOUT = float(os.environ.get("COMFYUI_TEST_TIMEOUT", "1800"))
PACK_NODES = 14
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
LINK_NAME = "comfyui_concept_em"
# While a prompt runs: comfy/lora.py's unloaded keys, comfy/sd1_clip.py's missing embeddings, any error.
BAD_RUN_LINES = ("lora key not loaded", "does not exist, ignoring", "embedding will be ignored",
                 "Traceback (most recent call last)")
# At start: nodes.py's lines for a pack that failed to import (other packs' or optional built-ins' are not ours).
BAD_IMPORT_LINES = ("IMPORT FAILED", "Cannot import")

needs_comfyui = pytest.mark.skipif(
    not COMFYUI_DIR, reason="COMFYUI_DIR is not set: point it at a ComfyUI checkout (with its requirements "
                            "installed) to run the pack in a real ComfyUI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ComfyUI process on a free local port, its base directory a temporary folder."""

    def __init__(self, comfy_dir: Path, extra_args: tuple[str, ...] = (), base: Path | None = None):
        """`base`: an earlier server's base directory to run in (its owner removes it); else a new one."""
        self.own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="concept_em_comfy_")) if base is None else Path(base)
        (self.base / "custom_nodes").mkdir(exist_ok=True)
        self.link = self.base / "custom_nodes" / LINK_NAME
        self.link.symlink_to(PACK, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / f"server_{self.port}.log" if base is not None else self.base / "server.log"
        self.log = open(self.log_path, "w")
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400: the prompt did not validate; say why
            pytest.fail(f"POST {path}: {exc.code} {exc.read().decode(errors='replace')[:4000]}")

    def wait_for_nodes(self, timeout: float = 600) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            self.alive()
            try:
                return self.get("/object_info", timeout=60)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        pytest.fail(f"ComfyUI did not answer /object_info in {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        try:  # workers the server started (DenseCRF's process pool) are in its own session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()
        self.link.unlink()
        if self.own_base:
            remove_base(self.base)


def remove_base(base: Path) -> None:
    if os.environ.get("COMFYUI_KEEP_BASE"):
        print(f"ComfyUI base directory kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    comfy = Path(COMFYUI_DIR).expanduser().resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR}: no main.py there; give a ComfyUI checkout")
    srv = Server(comfy)
    try:
        srv.info = srv.wait_for_nodes()
        yield srv
    finally:
        srv.stop()


class WebSocket(threading.Thread):
    """A minimal RFC 6455 client (the standard library has none) that keeps every JSON message the
    server sends this client id; binary frames (image previews) are skipped."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, port: int, client_id: str):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket: the server closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest())
        if b" 101 " not in head.split(b"\r\n")[0] or accept not in head:
            raise ConnectionError(f"websocket: no upgrade ({head[:200]!r})")
        self.sock.settimeout(None)
        self.messages: list[dict] = []

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:  # client frames are masked
        mask = os.urandom(4)
        head = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames: payload under 126 bytes
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def run(self) -> None:
        message, kind = b"", None
        try:
            while True:
                b0, b1 = self._read(2)
                fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 8:  # close
                    return
                if opcode == 9:  # ping
                    self._send(10, payload)
                    continue
                if opcode == 10:
                    continue
                if opcode in (1, 2):
                    message, kind = payload, opcode
                else:  # continuation
                    message += payload
                if fin and kind == 1:
                    self.messages.append(json.loads(message))
        except (OSError, EOFError, ValueError):
            return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def ui_to_api(workflow: dict, info: dict) -> dict:
    """The API-format prompt the front end would queue for a UI-format workflow: each node's inputs in
    the server's input_order, a widget's value from widgets_values in that order (skipping the value
    of a seed's control_after_generate widget and of an image upload button), a link as
    [source id, output slot]."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n.get("mode", 0) != 0:
            continue
        d = info[n["type"]]
        specs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        order = d["input_order"].get("required", []) + d["input_order"].get("optional", [])
        values = iter(n.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name in order:
            typ, opts = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            widget = isinstance(typ, list) or typ in WIDGET_TYPES
            if widget:
                value = next(values)
                if opts.get("control_after_generate", typ == "INT" and name in ("seed", "noise_seed")):
                    next(values)
                if opts.get("image_upload"):
                    next(values)
            if name in linked:
                lk = links[linked[name]]
                inputs[name] = [str(lk[1]), lk[2]]
            elif widget:
                inputs[name] = value
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def run_prompt(srv: Server, prompt: dict, what: str) -> tuple[dict, list[dict]]:
    """Queues `prompt` as a client with a websocket open; returns its /history entry and the messages,
    after checking what the server logged while it ran."""
    since = len(srv.log_text())
    client = uuid.uuid4().hex
    ws = WebSocket(srv.port, client)
    ws.start()
    try:
        queued = srv.post("/prompt", {"prompt": prompt, "client_id": client})
        assert not queued.get("node_errors"), queued
        pid = queued["prompt_id"]
        end = time.time() + TIMEOUT
        while time.time() < end:
            srv.alive()
            try:
                entry = srv.get(f"/history/{pid}").get(pid)
            except (urllib.error.URLError, ConnectionError):  # the server died (e.g. killed for memory): say so
                time.sleep(2)
                srv.alive()
                raise
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                break
            time.sleep(2)
        else:
            pytest.fail(f"{what}: not done in {TIMEOUT:.0f} s:\n{srv.log_text()[-4000:]}")
        time.sleep(1)  # the last messages
    finally:
        ws.close()
    status = entry["status"]
    log = srv.log_text()[since:]
    assert status.get("status_str") == "success", f"{what}: {json.dumps(status.get('messages'))[:4000]}\n{log[-4000:]}"
    found = [line for line in log.splitlines() if any(bad in line for bad in BAD_RUN_LINES)]
    assert not found, f"{what}: ComfyUI logged\n" + "\n".join(found[:20])
    return entry, ws.messages


def run_learning_workflow(server, workflow: str, ckpt_name: str, label: str):
    """A shipped learning workflow on `ckpt_name` and the input example.png, its costs lowered to a
    few steps at 64 px; (history entry, websocket messages, the concept files it saved, the prompt run)."""
    learn = ui_to_api(json.loads((WORKFLOWS / workflow).read_text()), server.info)
    low = {"CheckpointLoaderSimple": {"ckpt_name": ckpt_name}, "LoadImage": {"image": "example.png"},
           "ConceptEM_AttentionMaskInit": {"timesteps": 2, "resolution": 64},
           "ConceptEM_EMTokenStep": {"steps": 2, "refresh_every": 1, "refresh_timesteps": 2},
           "ConceptEM_JointFinetune": {"steps": 2},
           "ConceptEM_Generate": {"steps": 2, "width": 64, "height": 64, "batch_size": 1}}
    for node in learn.values():
        node["inputs"].update(low.get(node["class_type"], {}))
    entry, messages = run_prompt(server, learn, label)
    saved = [Path(t) for o in entry["outputs"].values() for t in o.get("text", []) if t.endswith(".safetensors")]
    # Numbered as Save Image numbers: 00001 on a fresh server, the next free number after other tests' saves.
    assert len(saved) == 1 and re.fullmatch(r"my_concepts_\d{5}_\.safetensors", saved[0].name), saved
    assert saved[0].is_file() and saved[0].parent == server.base / "models" / "concepts"
    return entry, messages, saved, learn


def check_import_log(srv: Server) -> None:
    found = [line for line in srv.log_text().splitlines()
             if LINK_NAME in line and any(bad in line for bad in BAD_IMPORT_LINES)]
    assert not found, "ComfyUI's log:\n" + "\n".join(found)


@needs_comfyui
def test_the_pack_registers_with_its_descriptions(server):
    info = server.info
    ours = {k: v for k, v in info.items() if k.startswith("ConceptEM_")}
    assert len(ours) >= PACK_NODES, sorted(ours)
    for name, d in ours.items():
        assert d["description"], name
        for section in ("required", "optional"):
            for inp, spec in d["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (name, inp)
    check_import_log(server)


@needs_comfyui
def test_the_tiny_workflow_runs_unmodified(server):
    workflow = json.loads((WORKFLOWS / "concept_em_tiny_world.json").read_text())
    prompt = ui_to_api(workflow, server.info)
    entry, messages = run_prompt(server, prompt, "tiny workflow")
    kinds = [m.get("type") for m in messages]
    assert "execution_start" in kinds or "executing" in kinds, kinds[:20]
    # Live messages reach the client that queued it (issue 16, part 7), from the learning nodes.
    progress = [m["data"] for m in messages if m.get("type") == "concept_em.progress"]
    ids = {n["id"] for n in workflow["nodes"] if n["type"] in ("ConceptEM_EMTokenStep", "ConceptEM_JointFinetune")}
    assert progress and {int(str(p["node"]).split(":")[-1]) for p in progress} <= ids, progress[:3]
    outputs = entry["outputs"]
    save = next(n for n in workflow["nodes"] if n["type"] == "SaveImage")
    images = outputs[str(save["id"])]["images"]
    assert len(images) == 4  # Concept Generate's batch_size
    from PIL import Image

    for im in images:
        path = server.base / "output" / im.get("subfolder", "") / im["filename"]
        with Image.open(path) as img:
            assert img.size == (64, 64)
    bundle = next(n for n in workflow["nodes"] if n["type"] == "ConceptEM_SaveBundle")
    saved = Path(outputs[str(bundle["id"])]["text"][0])
    assert saved == server.base / "models" / "concepts" / "my_concepts_00001_.safetensors" and saved.is_file()
    assert saved.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as a plain write (issue 16, part 8)
    from em_core.concept_file import load_concepts

    cb = load_concepts(saved)
    assert cb.concepts.names and cb.weights is not None and cb.weights.kind == "lora"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_SD15"), reason="set COMFYUI_SD15=1 to also run the SD workflows "
                                                              "on a random SD-1.5-shaped checkpoint (slow)")
def test_the_sd_workflows_run_on_a_random_sd15_checkpoint(server):
    from safetensors.torch import save_file

    from em_core.model_io.ldm_layout import bundle_to_ldm
    from em_core.tiny_world.scenes import make_scene
    from em_core.tiny_world.tiny_model import build_model

    ckpt = server.base / "models" / "checkpoints" / "concept_em_random_sd15.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in bundle_to_ldm(build_model("sd15", seed=0)).items()}, str(ckpt))
    (server.base / "input").mkdir(exist_ok=True)
    make_scene(seed=10).image.save(server.base / "input" / "example.png")

    entry, _, saved, _ = run_learning_workflow(server, "concept_em_full_sd15.json", ckpt.name,
                                               "SD-1.5-shaped learning workflow")

    reuse = ui_to_api(json.loads((WORKFLOWS / "concept_em_reuse_concepts.json").read_text()), server.info)
    low = {"CheckpointLoaderSimple": {"ckpt_name": ckpt.name}, "ConceptEM_LoadBundle": {"bundle": saved[0].name},
           "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1}, "KSampler": {"steps": 2}}
    for node in reuse.values():
        node["inputs"].update(low.get(node["class_type"], {}))
    entry, _ = run_prompt(server, reuse, "reuse workflow")
    images = [im for o in entry["outputs"].values() for im in o.get("images", [])]
    assert images and all((server.base / "output" / im.get("subfolder", "") / im["filename"]).is_file()
                          for im in images)
    # run_prompt found no unloaded LoRA key and no missing embedding in the log while it ran.
    assert sorted(p.name for p in (server.base / "models" / "embeddings").iterdir())[:1] == ["my_concepts_v1.safetensors"]


# The front end's graph as the browser has it: node boxes (title bar included), nodes whose type
# is not registered, overlapping pairs (ids and overlap in px).
LAYOUT_JS = """() => {
    const th = LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph._nodes;
    const boxes = nodes.map(n => ({id: n.id, x: n.pos[0], y: n.pos[1] - th, w: n.size[0], h: n.size[1] + th}));
    const overlaps = [];
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i], b = boxes[j];
        const ox = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x);
        const oy = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
        if (ox > 0 && oy > 0) overlaps.push([a.id, b.id, Math.round(ox), Math.round(oy)]);
    }
    return {n: nodes.length, missing: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
            overlaps};
}"""
# Tiny workflow widgets for a short run whose DenseCRF wipes out the concepts (a certain warning).
WARNING_RUN = {10: {"timesteps": 10}, 11: {"preset": "custom", "iterations": 10, "gaussian_sxy": 100.0,
                                            "gaussian_weight": 100.0, "bilateral_sxy": 1000.0,
                                            "bilateral_srgb": 255.0, "bilateral_weight": 100.0},
               12: {"steps": 4, "refresh_every": 2, "refresh_timesteps": 10},
               13: {"steps": 2, "refresh_every": 1, "refresh_timesteps": 10}, 14: {"steps": 2},
               15: {"steps": 2, "batch_size": 1}}


@needs_comfyui
def test_the_front_end_loads_each_workflow_and_shows_the_packs_warnings(server):
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                          "(pip install playwright; it uses the system's Chromium)").sync_playwright
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium: set CHROMIUM or install Debian's chromium")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack or ''}"))
            page.on("console", lambda m: m.type == "error" and errors.append(f"{m.text} {m.location.get('url', '')}"))
            page.goto(server.url, timeout=300_000)
            page.wait_for_function("() => window.app && app.graph && app.canvas", timeout=300_000)
            assert page.evaluate("() => app.extensions.map(e => e.name)").count("concept_em.live_preview") == 1
            for path in sorted(WORKFLOWS.glob("*.json")):
                page.evaluate("(d) => app.loadGraphData(d)", json.loads(path.read_text()))
                layout = page.evaluate(LAYOUT_JS)
                assert layout["n"] and not layout["missing"] and not layout["overlaps"], (path.name, layout)
            page.evaluate("(d) => app.loadGraphData(d)", json.loads((WORKFLOWS / "concept_em_tiny_world.json").read_text()))
            page.evaluate("""(values) => { for (const [id, widgets] of Object.entries(values)) for (const [name, v] of
                Object.entries(widgets)) app.graph.getNodeById(Number(id)).widgets.find(w => w.name === name).value = v; }""",
                          WARNING_RUN)
            page.evaluate("() => app.queuePrompt(0, 1)")
            toast = page.locator(".p-toast-message-warn", has_text="DenseCRF removed").first
            toast.wait_for(state="visible", timeout=min(TIMEOUT, 600) * 1000)
            assert "DenseCRF Refine #11" in toast.inner_text()
            end = time.time() + TIMEOUT  # the run's end: the live previews have grown the learning nodes
            while time.time() < end and any(server.get("/queue").values()):
                time.sleep(2)
            layout = page.evaluate(LAYOUT_JS)
            assert not layout["overlaps"], ("tiny workflow after its run", layout)
        finally:
            browser.close()
    ours = [e for e in errors if "concept_em" in e]
    assert not ours, ours


# A random SDXL of the real shapes, made in a child process so that its 7 GB (fp16: the modules are
# built in half precision, never as a 14 GB float32 model) go back to the system before ComfyUI loads it.
_MAKE_SDXL = """
import sys, torch
from safetensors.torch import save_file
from em_core.model_io.ldm_layout import bundle_to_ldm
from em_core.tiny_world.tiny_model import build_model
torch.set_default_dtype(torch.float16)
save_file(bundle_to_ldm(build_model("sdxl", seed=0)), sys.argv[1])
"""


@needs_comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_SDXL"), reason="set COMFYUI_SDXL=1 to also run the SDXL workflow on "
                                                              "a random checkpoint of SDXL's real shapes (7 GB on "
                                                              "disk, about 20 GB of memory; run it alone, -k sdxl)")
def test_the_sdxl_workflow_runs_on_a_random_sdxl_checkpoint_and_its_exports_load_in_core_nodes():
    comfy = Path(COMFYUI_DIR).expanduser().resolve()
    fp8 = ("--fp8_e4m3fn-unet", "--fp8_e4m3fn-text-enc")
    base = Path(tempfile.mkdtemp(prefix="concept_em_comfy_"))
    try:
        _sdxl_learn_export_and_reuse(comfy, fp8, base)
    finally:
        remove_base(base)


def _sdxl_learn_export_and_reuse(comfy: Path, fp8: tuple[str, ...], base: Path) -> None:
    from em_core.concept_file import load_concepts
    from em_core.tiny_world.scenes import make_scene
    from safetensors import safe_open

    srv = Server(comfy, fp8, base=base)
    try:
        ckpt = srv.base / "models" / "checkpoints" / "concept_em_random_sdxl.safetensors"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _MAKE_SDXL, str(ckpt)], check=True, cwd=PACK, timeout=TIMEOUT)
        (srv.base / "input").mkdir(exist_ok=True)
        make_scene(seed=10).image.save(srv.base / "input" / "example.png")
        srv.info = srv.wait_for_nodes()
        check_import_log(srv)

        entry, messages, saved, learn = run_learning_workflow(srv, "concept_em_full_sdxl.json", ckpt.name,
                                                             "SDXL learning workflow")
        images = [im for o in entry["outputs"].values() for im in o.get("images", []) if im.get("type") == "output"]
        assert images and all((srv.base / "output" / im.get("subfolder", "") / im["filename"]).is_file()
                              for im in images)
        cb = load_concepts(saved[0])
        assert cb.meta["base_model"]["family"] == "sdxl" and cb.weights is not None

        # The bundle exported for core nodes: embeddings (clip_l + clip_g in one file) and a kohya LoRA.
        ids = {node["class_type"]: key for key, node in learn.items()}
        model = ids["ConceptEM_ModelFromCheckpoint"]
        export = {k: learn[k] for k in (ids["CheckpointLoaderSimple"], model)}
        export["90"] = {"class_type": "ConceptEM_LoadBundle",
                        "inputs": {"em_model": [model, 0], "bundle": saved[0].name, "allow_other_model": False}}
        export["91"] = {"class_type": "ConceptEM_Export",
                        "inputs": {"concepts": ["90", 0], "name": "my_concepts_xl", "lora_rank": 4}}
        entry, _ = run_prompt(srv, export, "SDXL export")
        hint = entry["outputs"]["91"]["text"][0]
        lora = srv.base / "models" / "loras" / "my_concepts_xl.safetensors"
        assert f"LoRA: {lora.name}" in hint and lora.is_file(), hint
        with safe_open(str(lora), "pt") as f:
            prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in f.keys()}
        assert {"lora_unet", "lora_te1", "lora_te2"} <= prefixes, prefixes
        embeddings = sorted((srv.base / "models" / "embeddings").glob("my_concepts_xl_v*.safetensors"))
        assert len(embeddings) == len(cb.concepts.names)
        for e in embeddings:
            with safe_open(str(e), "pt") as f:
                assert set(f.keys()) == {"clip_l", "clip_g"}, (e.name, list(f.keys()))
    finally:
        srv.stop()  # the engine's float32 copy goes with it

    core = Server(comfy, fp8[:1], base=base)  # ComfyUI's own text encoders, as a user has them
    try:
        core.info = core.wait_for_nodes()
        words = " and ".join(f"embedding:{e.stem}" for e in embeddings)
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt.name}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora.name,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": f"a photo of {words}"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                       "sampler_name": "euler", "scheduler": "normal",
                                                       "positive": ["3", 0], "negative": ["4", 0],
                                                       "latent_image": ["5", 0], "denoise": 1.0}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "concept_em_xl_core"}},
        }
        entry, _ = run_prompt(core, prompt, "core Load LoRA + CLIP Text Encode on SDXL")
        # run_prompt found no unloaded LoRA key, missing or ignored embedding in the log while it ran.
        assert entry["outputs"]["8"]["images"]
    finally:
        core.stop()


# What runs without ComfyUI (CI): the conversion and the websocket client, on stand-ins.

def object_info_like_the_server() -> dict:
    """/object_info as server.py's node_info builds it (input, input_order), for this pack's nodes and,
    from the core definitions recorded in tests/data, the core nodes (types only: no options)."""
    import nodes as pack

    info = {}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        it = cls.INPUT_TYPES()
        info[name] = {"input": it, "input_order": {k: list(v) for k, v in it.items()}}
    core = json.loads((PACK / "tests" / "data" / "comfyui_core_nodes.json").read_text())["nodes"]
    for name, d in core.items():
        it = {sec: {k: ([] if t == "COMBO" else t,) for k, t in d.get(sec, {}).items()}
              for sec in ("required", "optional")}
        if name == "LoadImage":
            it["required"]["image"] = ([], {"image_upload": True})
        info[name] = {"input": it, "input_order": {k: list(v) for k, v in it.items()}}
    return info


def test_ui_to_api_gives_each_input_its_widget_value_or_link():
    info = object_info_like_the_server()
    tiny = ui_to_api(json.loads((WORKFLOWS / "concept_em_tiny_world.json").read_text()), info)
    assert tiny["2"] == {"class_type": "ConceptEM_TinyWorldScene", "inputs": {"seed": 3, "objects": 2}}
    init = tiny["10"]["inputs"]
    assert init["em_model"] == ["1", 0] and init["images"] == ["2", 0]
    assert init["prompts"] == ["2", 1] and init["init_words"] == ["2", 2]  # links win over stored values
    assert (init["timesteps"], init["threshold"], init["warmup_steps"], init["seed"], init["resolution"]) == \
        (50, 0.5, 0, 0, 0)
    ft = tiny["14"]["inputs"]
    assert (ft["steps"], ft["learning_rate"], ft["mode"], ft["mixed_precision"]) == (40, 0.0, "lora", "auto")
    assert tiny["16"] == {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "concept_em"}}
    full = ui_to_api(json.loads((WORKFLOWS / "concept_em_full_sd15.json").read_text()), info)
    assert full["3"] == {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    assert full["2"]["inputs"] == {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                   "prediction_type": "from model"}
    reuse = ui_to_api(json.loads((WORKFLOWS / "concept_em_reuse_concepts.json").read_text()), info)
    ks = reuse["8"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == \
        (1, 30, 7.0, "dpmpp_2m", "karras", 1.0)
    assert ks["model"] == ["4", 0] and ks["latent_image"] == ["7", 0]


def _serve_frames(listener: socket.socket, frames: list[bytes], got: dict) -> None:
    conn, _ = listener.accept()
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + WebSocket.GUID.encode()).digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + b"".join(frames))
        conn.settimeout(5)
        try:
            got["pong"] = conn.recv(64)  # the client answers the ping
        except OSError:
            got["pong"] = b""


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


def test_the_websocket_client_reads_what_comfyui_sends():
    big = json.dumps({"type": "concept_em.progress", "data": {"node": "12", "masks": "x" * 70000}}).encode()
    frames = [_frame(9, b"hi"),  # a ping first: the client answers it
              _frame(1, json.dumps({"type": "status", "data": {}}).encode()),
              _frame(2, b"\x00\x01binary preview"),  # skipped
              _frame(1, big[:1000], fin=False), _frame(0, big[1000:]),  # fragmented; a 64-bit length
              _frame(1, json.dumps({"type": "executing", "data": {"node": None}}).encode() + b" " * 300),
              _frame(8, b"")]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    got = {}
    server = threading.Thread(target=_serve_frames, args=(listener, frames, got), daemon=True)
    server.start()
    ws = WebSocket(listener.getsockname()[1], "client-1")
    ws.start()
    ws.join(10)
    server.join(10)
    listener.close()
    assert [m["type"] for m in ws.messages] == ["status", "concept_em.progress", "executing"]
    assert len(ws.messages[1]["data"]["masks"]) == 70000
    pong = got["pong"]
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2  # a masked pong carrying the ping's payload
    mask = pong[2:6]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(pong[6:8])) == b"hi"
