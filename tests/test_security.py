"""A server strangers can share (issue 25), probed from outside the way a curious stranger would.

One server subprocess with two logins (alice, bob) and its own empty TMPDIR, driven through gradio_client and raw
HTTP:
* model fields take names, not paths: every probe of the server's files gets one message shape naming no path;
* a file reference that was never uploaded gets a one-line message, never an empty error event;
* files are private to their user: bob gets 403 on alice's upload and result, alice gets them;
* a Cancel pressed in the page stops that run only: the same client's next drag runs;
* after SIGTERM the system temp dir holds nothing the app made.
In-process: the registry answers without touching the filesystem, and ``--allow-pickle`` never runs pickle code.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from models.errors import EditError
from tests.conftest import scene
from tests.serving import free_port

ROOT = Path(__file__).resolve().parents[1]
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
POINTS = "[[20, 30], [40, 30]]"
FAST = dict(lora_steps=2, n_inference_steps=4, max_steps=3, method="DragDiffusion", seed=3)
SLOW = dict(lora_steps=400, n_inference_steps=50, max_steps=400, method="DragDiffusion", seed=3)  # minutes
HOME = str(Path.home())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``app.py --model tiny --auth alice:… --auth bob:…`` with TMPDIR pointed at an empty folder."""
    base = tmp_path_factory.mktemp("security")
    systmp = base / "systmp"
    systmp.mkdir()
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                        "TMPDIR": str(systmp)}
    auth = [a for user, pw in USERS.items() for a in ("--auth", f"{user}:{pw}")]
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--port", str(port),
                             "--outputs", str(base / "outputs"), *auth], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}config", timeout=2).status_code in (200, 401):
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}")
        if time.monotonic() - t0 > 180:
            proc.kill()
            pytest.fail("the server did not start")
        time.sleep(0.5)
    try:
        yield type("Server", (), {"url": url, "proc": proc, "systmp": systmp, "base": base})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("security-in") / "in.png"
    scene(96, 64).save(path)
    return str(path)


def client_of(server, user: str, **kwargs) -> Client:
    return Client(server.url, auth=(user, USERS[user]), verbose=False, **kwargs)


def http_of(server, user: str) -> httpx.Client:
    """A raw HTTP session logged in as ``user`` (the page's own cookie)."""
    http = httpx.Client(base_url=server.url, timeout=60)
    r = http.post("login", data={"username": user, "password": USERS[user]})
    assert r.status_code == 200, r.text
    return http


# ---- 1. model fields: names, never paths ------------------------------------------------------------------
PROBES = ["/etc", "/no/such/folder", "~/.cache", HOME, "/etc/passwd", "/", "models/toy/unet", "../models/toy"]


def shape(message: str, probe: str) -> str:
    return message.replace(repr(probe), "<typed>")


def test_model_fields_answer_every_probe_alike_and_name_no_server_path(server, picture):
    client = client_of(server, "alice")
    shapes = set()
    for kind in ("controlnet", "t2i_adapter", "ip_adapter"):
        for probe in PROBES:
            unit = {"kind": kind, "model": probe, **({"images": [0]} if kind == "ip_adapter" else {"image": 0})}
            with pytest.raises(AppError) as e:
                client.predict("a cat", "", json.dumps([unit]), [handle_file(picture)], n_inference_steps=2,
                               api_name="/text_to_image")
            m = str(e.value)
            assert "\n" not in m and HOME not in m.replace(repr(probe), "") and "/tmp" not in m, m
            shapes.add(shape(m, probe).replace("IP-Adapter", "X").replace("T2I-Adapter", "X").split(" Choose")[0])
    for probe in PROBES:
        with pytest.raises(AppError) as e:
            client.predict(handle_file(picture), None, "", "", probe, n_inference_steps=2, api_name="/sketch")
        shapes.add(shape(str(e.value), probe).split(" Choose")[0])
    assert shapes == {"Unknown ControlNet <typed>.", "Unknown X <typed>."}, shapes


def test_the_registry_answers_without_touching_the_filesystem():
    """The refusal is a dict lookup: with every filesystem look-up made to fail, the message is the same."""
    from models.registry import scan
    from ui.common import model_names
    from ui.sketch_tab import scribble_spec

    names = scan()
    model_names()  # the app's registry is scanned once, at start
    expected = {p: str(_refusal(lambda p=p: names.resolve("controlnet", p))) for p in PROBES}
    with _no_filesystem():
        got = {p: str(_refusal(lambda p=p: names.resolve("controlnet", p))) for p in PROBES}
        sketch = [str(_refusal(lambda p=p: scribble_spec(p))) for p in PROBES]
        tiny = names.resolve("controlnet", "tiny")
    assert got == expected and tiny == "tiny"
    assert all(m.startswith("Unknown ControlNet") for m in sketch), sketch


@contextlib.contextmanager
def _no_filesystem():
    """Every way of looking at a path raises while inside (restored before pytest needs them again)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the filesystem was consulted")

    saved = [(os, n, getattr(os, n)) for n in ("stat", "lstat", "scandir", "listdir", "walk")]
    saved += [(Path, n, getattr(Path, n)) for n in ("exists", "is_dir", "is_file", "rglob", "glob", "iterdir")]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, forbidden)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def test_models_dirs_are_offered_by_name_and_hub_ids_only_with_the_flag(tmp_path):
    from models.registry import scan

    cn = tmp_path / "my-canny"
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (tmp_path / "my-vae").mkdir()
    (tmp_path / "my-vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "notes").mkdir()  # no config: not offered
    names = scan([tmp_path])
    assert names.resolve("controlnet", "my-canny") == str(cn) and "my-canny" in names.choices("controlnet")
    assert names.resolve("vae", "my-vae") == str(tmp_path / "my-vae")
    for refused in ("notes", str(cn), "my-vae", "someone/else"):
        with pytest.raises(EditError, match="Unknown ControlNet"):
            names.resolve("controlnet", refused)
    hub = scan([tmp_path], allow_hub=True)
    assert hub.resolve("controlnet", "someone/else") == "someone/else"
    for refused in ("../x", "/etc", "a/b/c", "~/.cache"):
        with pytest.raises(EditError, match=r"or any Hub id"):
            hub.resolve("controlnet", refused)


def _refusal(call) -> Exception:
    try:
        call()
    except (EditError, AssertionError) as e:  # the message is what the test compares
        return e
    raise AssertionError("not refused")


# ---- 2. a never-uploaded file: a message, not an empty error event --------------------------------------------
def _call_raw(http: httpx.Client, api: str, data: list) -> tuple[str, str]:
    """POST /gradio_api/call/<api>, then read its event stream: (last event name, its data)."""
    r = http.post(f"gradio_api/call/{api}", json={"data": data})
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    name, payload = "", ""
    with http.stream("GET", f"gradio_api/call/{api}/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = line.split(":", 1)[1].strip()
                if name in ("complete", "error"):
                    break
    return name, payload


def test_a_file_that_was_never_uploaded_is_named_in_the_error_event(server):
    client = client_of(server, "alice")
    http = http_of(server, "alice")
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    bogus = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    for api, field in (("drag", 0), ("sketch", 0), ("text_to_image", 3)):
        params = info[f"/{api}"]["parameters"]
        data = [p.get("parameter_default") for p in params]
        data[field] = [bogus] if api == "text_to_image" else bogus
        event, payload = _call_raw(http, api, data)
        assert event == "error", (api, event, payload)
        message = json.loads(payload)
        message = message.get("error") if isinstance(message, dict) else message
        assert isinstance(message, str) and "was not uploaded here" in message, (api, message)
        assert "/etc/passwd" not in message and "\n" not in message


# ---- 4. files per user ---------------------------------------------------------------------------------------
def test_files_are_served_only_to_the_user_whose_request_made_them(server, picture):
    alice, bob = http_of(server, "alice"), http_of(server, "bob")
    with open(picture, "rb") as f:
        r = alice.post("gradio_api/upload", files=[("files", ("in.png", f, "image/png"))])
    assert r.status_code == 200, r.text
    (upload,) = r.json()
    result = client_of(server, "alice", download_files=False).predict(
        handle_file(picture), None, POINTS, "", **FAST, api_name="/drag")[0][1]
    files = {"upload": f"gradio_api/file={upload}", "result": result["url"].split(server.url.rstrip("/") + "/")[-1]}
    for what, url in files.items():
        assert alice.get(url).status_code == 200, what
        assert bob.get(url).status_code == 403, what
        assert httpx.get(server.url + url).status_code in (401, 403), what  # no login: as before


# ---- 5. Cancel stops the run it was pressed for, never the next ------------------------------------------------
def _page_cancel(server, client: Client, http: httpx.Client) -> None:
    """What the Drag tab's Cancel button sends for the session ``client`` runs in (a private, unqueued event)."""
    config = client.config
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "cancel")
    dep = next(d for d in config["dependencies"] if [button, "click"] in [list(t) for t in d["targets"]])
    r = http.post("gradio_api/run/predict", json={"fn_index": dep["id"], "data": [None], "trigger_id": button,
                                                  "session_hash": client.session_hash, "event_data": None})
    assert r.status_code == 200, r.text


def test_a_page_cancel_of_an_api_run_does_not_stick_to_the_next_run(server, picture):
    client = client_of(server, "alice")
    job = client.submit(handle_file(picture), None, POINTS, "", **SLOW, api_name="/drag")
    t0 = time.monotonic()
    while job.status().code not in (Status.PROCESSING, Status.ITERATING, Status.PROGRESS):
        assert time.monotonic() - t0 < 120, "the slow drag did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # inside the identity-LoRA training (400 steps: minutes)
    _page_cancel(server, client, http_of(server, "alice"))
    job.result(timeout=120)  # the cancelled run ends (its outputs left as they were)
    result, _, _, _, status = client.predict(handle_file(picture), None, POINTS, "", **FAST, api_name="/drag")
    assert isinstance(result, (list, tuple)) and len(result) == 2, f"the next drag ran nothing: {result!r}"
    assert Path(result[1]).is_file() and "Done" in status


# ---- 3. nothing left behind ----------------------------------------------------------------------------------
def test_after_sigterm_the_temp_dir_holds_nothing_the_app_made(server):
    assert any(server.systmp.iterdir()), "the running server keeps its files under TMPDIR"
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        pytest.fail("SIGTERM did not stop the server")
    assert sorted(p.name for p in server.systmp.iterdir()) == []


# ---- 7. weights are data ------------------------------------------------------------------------------------
class _Evil:
    """A pickle whose loading would create ``marker`` (any code could run the same way)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_allow_pickle_reads_tensors_but_never_runs_a_pickles_code(tmp_path):
    import torch

    from editing.lora_library import add_to_library
    from models.adapters import AdapterError, _load_ip_weights
    from models.errors import EditError

    marker = tmp_path / "pwned"
    for name in ("lora.bin", "ip.bin"):
        torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2), "evil": _Evil(str(marker))}, tmp_path / name)
    (tmp_path / "image_encoder").mkdir()
    with pytest.raises(EditError, match="more than plain tensors") as e:
        add_to_library(tmp_path / "lora.bin", "evil", allow_pickle=True)
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)
    bundle = type("Bundle", (), {"family": type("F", (), {"name": "sd15"})})
    with pytest.raises(AdapterError, match="more than plain tensors"):
        _load_ip_weights(bundle, str(tmp_path / "ip.bin"), allow_pickle=True)
    assert not marker.exists(), "the pickle's code ran"
    torch.save({"a": torch.ones(2)}, tmp_path / "plain.pt")
    from models.safety import load_pickle_weights

    assert torch.equal(load_pickle_weights(tmp_path / "plain.pt")["a"], torch.ones(2))  # real weights still load


# ---- 8. the front door's test command --------------------------------------------------------------------------
def test_ci_runs_exactly_the_readme_test_block():
    """A fresh machine following the README installs the test dependencies before running the tests."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Test\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ["pip install -r requirements-dev.txt", "ruff check .", "python -m pytest -q"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-len(block):] == block
    assert "pytest" in (ROOT / "requirements-dev.txt").read_text()
