"""Serving the app to many users (issue 13), from the outside: gradio_client, raw HTTP and a server subprocess.

* API cancel and a client that disconnects stop the engine within a step; the next request starts at once and
  gives the same seeded output as before (the shared model is restored).
* A huge upload is refused within about a second while another client's request is served.
* Every result and its recipe are in the outputs folder the moment they exist; after the server is killed
  mid-edit and restarted, the earlier results are in the folder and in the history; SIGTERM removes the temp
  folder (and a killed server's is removed at the next start).
* 30 results give 30 distinct history entries (files and captions), and a restarted history brings them back.
* The GPU queue is bounded with a message saying why; a run over the time budget is stopped; optional login.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, AuthenticationError
from PIL import Image

from editing.images import read_recipe
from tests.conftest import scene
from tests.serving import free_port
from tests.test_hostile import served_app

ROOT = Path(__file__).resolve().parents[1]
POINTS = "[[20, 30], [40, 30]]"
FAST = dict(lora_steps=2, n_inference_steps=4, max_steps=3, method="DragDiffusion", seed=3)
SLOW = dict(lora_steps=400, n_inference_steps=50, max_steps=400, method="DragDiffusion", seed=3)  # minutes


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serving") / "in.png"
    scene(96, 64).save(path)
    return str(path)


@pytest.fixture(scope="module")
def served(editor, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("serving-outputs")
    with served_app(editor, outputs, "--max-file-size", "1mb", "--max-queued-per-session", "1",
                    "--max-queue", "4") as (url, demo, _):
        yield url, outputs


def drag(client, image, **settings):
    return client.predict(handle_file(image), None, POINTS, "", **(FAST | settings), api_name="/drag")


def submit_slow(client, image):
    return client.submit(handle_file(image), None, POINTS, "", **SLOW, api_name="/drag")


def engine_busy(editor) -> bool:
    if editor._lock.acquire(blocking=False):
        editor._lock.release()
        return False
    return True


def wait_for(condition, timeout: float, what: str) -> float:
    """Seconds until ``condition()`` holds (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---- cancel and disconnect ------------------------------------------------------------------------------------
def test_api_cancel_stops_the_engine_within_a_step_and_the_next_request_starts_at_once(served, editor, image_path):
    url, _ = served
    client = Client(url, verbose=False)
    t0 = time.monotonic()
    (_, before), *_ = drag(client, image_path)
    baseline_s = time.monotonic() - t0
    job = submit_slow(client, image_path)
    wait_for(lambda: engine_busy(editor), 30, "the slow drag starts")
    time.sleep(1.0)  # well inside the identity-LoRA training (400 steps: minutes)
    job.cancel()
    stopped_s = wait_for(lambda: not engine_busy(editor), 10, "the engine lets go after the API cancel")
    assert stopped_s < 3, f"the cancelled run held the engine {stopped_s:.1f} s"
    t0 = time.monotonic()
    (_, after), _, _, gallery, _ = drag(client, image_path)
    assert time.monotonic() - t0 < baseline_s + 5
    np.testing.assert_array_equal(pixels(after), pixels(before))  # the shared model was left as it was
    assert len(gallery) == 2  # the cancelled run left no result


CLIENT = """
import sys, time
from gradio_client import Client, handle_file
c = Client(sys.argv[1], verbose=False)
job = c.submit(handle_file(sys.argv[2]), None, {points!r}, "", api_name="/drag", **{slow!r})
print("submitted", flush=True)
time.sleep(600)
"""


def test_a_client_that_disconnects_stops_its_run(served, editor, image_path):
    url, _ = served
    code = CLIENT.format(points=POINTS, slow=SLOW)
    proc = subprocess.Popen([sys.executable, "-c", code, url, image_path], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "submitted"
        wait_for(lambda: engine_busy(editor), 60, "the disconnecting client's drag starts")
        time.sleep(1.0)
    finally:
        proc.kill()  # the page closes: its connection drops without a word
        proc.wait()
    stopped_s = wait_for(lambda: not engine_busy(editor), 30, "the engine lets go after the disconnect")
    assert stopped_s < 15, f"the abandoned run held the engine {stopped_s:.1f} s"
    (_, after), *_ = drag(Client(url, verbose=False), image_path)
    assert Image.open(after).size == (96, 64)


# ---- uploads ---------------------------------------------------------------------------------------------------
def test_a_huge_upload_is_refused_within_a_second_while_another_client_is_served(served, image_path, tmp_path):
    from tests.test_hostile import png_declaring

    url, _ = served
    bomb = png_declaring(tmp_path / "bomb.png", 12000, 12000)  # 17 KB on disk, 144 megapixels declared
    t0 = time.monotonic()
    httpx.get(f"{url}config", timeout=30)
    config_s = time.monotonic() - t0  # the page config on its own (a big app on a busy machine: not instant)
    other, attacker = Client(url, verbose=False), Client(url, verbose=False)
    served_job = other.submit(handle_file(image_path), None, POINTS, "", **FAST, api_name="/drag")
    bomb_job = attacker.submit(handle_file(str(bomb)), None, POINTS, "", **FAST, api_name="/drag")
    t0 = time.monotonic()
    assert httpx.get(f"{url}config", timeout=30).status_code == 200  # the page still loads meanwhile ...
    assert time.monotonic() - t0 < 2 * config_s + 1  # ... about as fast as on its own
    with pytest.raises(AppError) as e:
        bomb_job.result(timeout=120)
    assert "12000" in str(e.value) and "\n" not in str(e.value)
    (_, after), *_ = served_job.result(timeout=120)
    assert Image.open(after).size == (96, 64)
    t0 = time.monotonic()  # on its own (no drag ahead of it in the one GPU queue)
    with pytest.raises(AppError, match="12000"):
        attacker.predict(handle_file(str(bomb)), None, POINTS, "", **FAST, api_name="/drag")
    assert time.monotonic() - t0 < 1.5, "an oversized picture is refused within about a second"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024))  # over --max-file-size 1mb
    t0 = time.monotonic()
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", big.read_bytes())}, timeout=10)
    assert r.status_code == 413 and time.monotonic() - t0 < 1.5


# ---- the GPU queue ---------------------------------------------------------------------------------------------
def test_one_session_cannot_fill_the_queue(served, editor, image_path):
    url, _ = served
    client = Client(url, verbose=False)
    running = submit_slow(client, image_path)
    wait_for(lambda: engine_busy(editor), 30, "the slow drag starts")
    waiting = client.submit("a red ball", 1, 4, api_name="/generate")
    time.sleep(0.5)
    endpoint = next(e for e in client.endpoints.values() if getattr(e, "api_name", None) == "/generate")
    data = list(endpoint.insert_empty_state("a red ball", 1, 4))
    r = httpx.post(f"{url}gradio_api/queue/join", timeout=10,
                   json={"data": data, "fn_index": endpoint.fn_index, "session_hash": client.session_hash})
    assert r.status_code == 503 and "You already have 1 requests waiting" in r.json()["detail"]
    running.cancel()
    waiting.result(timeout=60)
    wait_for(lambda: not engine_busy(editor), 10, "the engine lets go")


# ---- history and the outputs folder ----------------------------------------------------------------------------
def _result(i: int):
    from editing.runtime import EditResult

    img = Image.new("RGB", (16, 16), (i * 8 % 256, 40, 200))
    return EditResult(image=img, recipe={"task": "drag", "params": {"seed": i}, "image_png": "AAAA"})


def test_thirty_results_are_thirty_distinct_entries_kept_and_restored(tmp_path):
    from ui.history import BeforeAfter, Results, configure, new_history_key

    key = new_history_key()
    try:
        configure(outputs=tmp_path / "out", temp_root=tmp_path / "tmp")
        drag_history, generated = BeforeAfter(), Results("generate")
        drag_history.key, generated.key = "history", "gen-gallery"
        drag_history.bind(key)
        generated.bind(key)
        for i in range(30):
            drag_history.add_result(Image.new("RGB", (16, 16)), _result(i), "drag", {"i": i})
            generated.add(_result(i), "generated", {"i": i})
        assert len(generated.gallery()) == 30
        assert len({p for p, _ in generated.gallery()}) == 30 and len({c for _, c in generated.gallery()}) == 30
        shown = drag_history.gallery()
        assert len(shown) == BeforeAfter.LIMIT and len({p for p, _ in shown}) == BeforeAfter.LIMIT
        assert [c for _, c in shown] == [f"{i}: drag" for i in range(7, 31)]
        for path, caption in shown:  # each entry shows its own picture
            i = int(caption.split(":")[0]) - 1
            assert Image.open(path).getpixel((0, 0)) == (i * 8 % 256, 40, 200)
        kept = sorted((tmp_path / "out").rglob("*-after.png"))
        assert len(kept) == 30 and all(read_recipe(p)["task"] == "drag" for p in kept)
        assert len(list((drag_history.dir).glob("*.png"))) == 2 * BeforeAfter.LIMIT  # older shown copies deleted
        # a new session with the same key (page reload, server restart) gets the same entries back
        again = BeforeAfter()
        again.key = "history"
        assert again.bind(key)
        assert [c for _, c in again.gallery()] == [c for _, c in shown]
        other = BeforeAfter()
        other.key = "history"
        assert not other.bind(new_history_key())  # another browser sees nothing
    finally:
        configure(outputs=None, temp_root=None)


def test_recipes_can_leave_the_input_out(tmp_path):
    from ui.history import Results, configure

    try:
        configure(outputs=tmp_path / "out", input_in_recipe=False)
        path = Results().keep(Image.new("RGB", (8, 8)), "x", {"task": "drag", "image_png": "AAAA", "params": {}})
        recipe = read_recipe(path)
        assert "image_png" not in recipe and recipe["inputs_left_out"] == ["image_png"]
    finally:
        configure(outputs=None, input_in_recipe=True)


# ---- a server subprocess: kill, restart, SIGTERM ---------------------------------------------------------------
def start_server(outputs: Path, port: int, env_extra: dict | None = None) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"} | (env_extra or {})
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--port", str(port),
                             "--outputs", str(outputs)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 180:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the server did not start")


def temp_roots(pid: int) -> list[Path]:
    import tempfile

    return list(Path(tempfile.gettempdir()).glob(f"dragcanvas-run-{pid}-*"))


@pytest.mark.slow  # 25-30 s each: a server started and killed
def test_a_killed_server_loses_nothing_and_sigterm_cleans_up(tmp_path, image_path):
    outputs, port = tmp_path / "outputs", free_port()
    key = "k" * 32
    url = f"http://127.0.0.1:{port}/"
    server = start_server(outputs, port)
    try:
        client = Client(url, verbose=False, headers={"x-dragcanvas-history": key})
        for _ in range(2):
            drag(client, image_path)
        job = submit_slow(client, image_path)
        time.sleep(3)  # mid-edit: training the identity LoRA
        assert not job.done()  # still running when the server dies
    finally:
        server.kill()
        server.wait()
    killed = server.pid
    assert temp_roots(killed), "the killed server's temp folder is left behind (until the next start)"
    kept = sorted(outputs.rglob("*-after.png"))
    assert len(kept) == 2 and all(read_recipe(p)["task"] == "dragdiffusion" for p in kept)
    assert not list(outputs.rglob("*.tmp")), "no torn file"

    server = start_server(outputs, port)
    try:
        assert not temp_roots(killed), "the next start removes a killed server's temp folder"
        client = Client(url, verbose=False, headers={"x-dragcanvas-history": key})
        _, _, _, gallery, _ = drag(client, image_path)
        assert [g["caption"] for g in gallery] == ["1: drag, 1 pair", "2: drag, 1 pair", "3: drag, 1 pair"]
        assert [pixels(g["image"]).tolist() for g in gallery[:2]] == [pixels(p).tolist() for p in kept]
        assert len(sorted(outputs.rglob("*-after.png"))) == 3
        # another client (no key, or another key) does not see these results
        _, _, _, theirs, _ = drag(Client(url, verbose=False), image_path)
        assert len(theirs) == 1
        assert temp_roots(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("SIGTERM did not stop the server")
    assert not temp_roots(server.pid), "SIGTERM removes the temp folder"


@pytest.mark.slow  # 25-30 s each: a server started and killed
def test_a_server_killed_mid_training_leaves_no_torn_or_half_trained_lora(tmp_path):
    """Personalize killed mid-training: the library holds no file of that name (nothing torn, nothing
    half-trained) and, after a restart, the same name trains and saves normally."""
    outputs, library, port = tmp_path / "outputs", tmp_path / "loras", free_port()
    library.mkdir()
    photos = []
    for i in range(2):
        photos.append(tmp_path / f"p{i}.png")
        scene(64, 64, seed=40 + i).save(photos[-1])
    env = {"DRAGCANVAS_LORA_DIR": str(library)}
    url = f"http://127.0.0.1:{port}/"
    server = start_server(outputs, port, env)
    try:
        client = Client(url, verbose=False)
        job = client.submit([handle_file(str(p)) for p in photos], "ring", "", "cut-short", False, False,
                            steps=400, api_name="/personalize")
        t0 = time.monotonic()
        while not any("step" in str(getattr(u, "progress_data", "") or "") for u in [job.status()]):
            assert not job.done() and time.monotonic() - t0 < 120, "training never reported a step"
            time.sleep(0.2)
        assert not job.done()  # mid-training when the server dies
    finally:
        server.kill()
        server.wait()
    assert not list(library.glob("cut-short*")), "a killed run put a LoRA file in the library"
    assert not list(library.rglob("*.tmp")), "no torn file"
    server = start_server(outputs, port, env)
    try:
        client = Client(url, verbose=False)
        client.predict([handle_file(str(p)) for p in photos], "ring", "", "cut-short", False, False,
                       steps=2, api_name="/personalize")
        assert (library / "cut-short.safetensors").is_file()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


# ---- login and the time budget ---------------------------------------------------------------------------------
def test_login_and_time_budget(editor, tmp_path, image_path):
    with served_app(editor, tmp_path / "out", "--auth", "ann:secret", "--time-budget", "2") as (url, *_):
        with pytest.raises(AuthenticationError):
            Client(url, verbose=False)
        client = Client(url, verbose=False, auth=("ann", "secret"))
        t0 = time.monotonic()
        with pytest.raises(AppError, match="limit of 2 s per request"):
            client.predict(handle_file(image_path), None, POINTS, "", **SLOW, api_name="/drag")
        assert time.monotonic() - t0 < 15
