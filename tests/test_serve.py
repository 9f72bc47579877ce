"""The Editor behind Ray Serve (editing/serve): a 2-replica local cluster on 2 CPUs, tiny model.

Same pixels as in process, cache-affine routing, cancel across the process boundary, a replica killed
mid-edit, and the clear messages for a bad address, a missing deployment and too many replicas.
"""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -r requirements-ray.txt)")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-ray.txt)")

from editing.drag import DragRequest
from models.errors import EditCancelled, EditError
from tests.conftest import FAST, scene

PAIR = (((30.0, 32.0), (45.0, 30.0)),)
APP = "dragcanvas-test"


def _wait_running(client, timeout=60.0) -> str:
    """The replica running the client's (only) call in flight, once it has started."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        running = client.running()
        if running:
            return next(iter(running.values()))
        time.sleep(0.05)
    raise AssertionError("the edit never started")


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_bad_address_is_one_clear_line_and_starts_nothing():
    from editing.serve.client import RemoteEditor

    if ray.is_initialized():
        pytest.skip("this process already joined a cluster")
    t0 = time.monotonic()
    with pytest.raises(EditError, match=r"No Ray cluster answers at 127\.0\.0\.1:1 .*ray start --head") as e:
        RemoteEditor("127.0.0.1:1")
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 10
    assert not ray.is_initialized()
    with pytest.raises(EditError, match="Bad Ray address"):
        RemoteEditor("localhost:port")


def test_app_backend_flag_exits_with_one_line_before_building_anything():
    import app

    if ray.is_initialized():
        pytest.skip("this process already joined a cluster")
    for backend, says in (("gpu-farm", "expected local, ray or ray:HOST:PORT"),
                          ("ray:127.0.0.1:1", "No Ray cluster answers at 127.0.0.1:1")):
        with pytest.raises(SystemExit) as e:
            app.build(app.parse_args(["--backend", backend, "--outputs", "/nonexistent-never-made"]))
        assert says in str(e.value) and "\n" not in str(e.value)
    assert not ray.is_initialized() and not Path("/nonexistent-never-made").exists()


@pytest.fixture(scope="module")
def served():
    from ray import serve

    from editing.serve import cluster
    from editing.serve.client import RemoteEditor

    cluster.connect(None, num_cpus=2)
    try:
        cluster.deploy("tiny", replicas=2, cpus_per_replica=0.5, threads=1, app=APP, drain_s=30)
        yield RemoteEditor(None, app=APP)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.timeout(300)  # includes starting the cluster (20 s on 2 idle cores)
def test_same_pixels_as_in_process_and_the_repeat_edit_reuses_the_replicas_caches(served, editor):
    req = DragRequest(scene(seed=3), PAIR, None, **FAST)
    seen = []
    first = served.edit(req, progress=lambda *a: seen.append(a))
    editor.clear_caches()
    local = editor.edit(req)
    assert np.array_equal(np.asarray(first.image), np.asarray(local.image))
    assert first.unet_calls == local.unet_calls and first.unet_calls.get("lora") and first.unet_calls.get("inversion")
    assert {p for p, _, _ in seen} >= {"lora", "inversion", "drag", "denoise"}  # progress crossed the boundary
    time.sleep(0.5)  # the replica reports the image it now holds to the router (every 0.1 s)
    again = served.edit(req.replace(points=(((30.0, 32.0), (40.0, 40.0)),)))
    assert again.extra["served_by"] == first.extra["served_by"]
    assert "lora" not in again.unet_calls and "inversion" not in again.unet_calls
    assert served.is_drag_ready(req.image) is False


@pytest.mark.timeout(120)
def test_an_edit_error_arrives_as_edit_error_with_its_message(served):
    req = DragRequest(scene(seed=4), PAIR, None, **FAST)
    with pytest.raises(EditError, match="takes a DragRequest"):
        served.drag(object())
    with pytest.raises(EditError, match="not a DragCanvas recipe"):
        served.replay({"no": "task"})
    with pytest.raises(EditError, match="Unknown recipe task"):  # raised on the replica, message intact
        served.replay({"task": "nope", "image_png": None})
    assert served.edit(req).image.size == req.image.size  # and the replica still serves


@pytest.mark.timeout(120)
def test_cancel_through_the_client_stops_the_replicas_run(served):
    image = scene(seed=11)
    slow = DragRequest(image, PAIR, None, **{**FAST, "lora_steps": 400})  # far longer than the test waits
    cancel = threading.Event()
    worker, out = _in_thread(lambda: served.edit(slow, cancel=cancel))
    _wait_running(served)
    time.sleep(1.0)  # into the identity-LoRA phase
    t0 = time.monotonic()
    cancel.set()
    worker.join(30)
    assert not worker.is_alive() and isinstance(out.get("error"), EditCancelled), out
    assert time.monotonic() - t0 < 15
    end = time.monotonic() + 15
    while (stats := served.stats(image))["queued_or_running"] and time.monotonic() < end:
        time.sleep(0.2)
    assert stats["queued_or_running"] == 0 and stats["cancelled"] >= 1, stats


def test_missing_deployment_and_too_many_replicas_are_clear(served):
    from editing.serve import cluster
    from editing.serve.client import RemoteEditor

    with pytest.raises(EditError, match="No DragCanvas deployment named 'nope'.*python -m editing.serve"):
        RemoteEditor(None, app="nope")
    with pytest.raises(EditError, match=r"3 replicas × 1 GPU need 3 GPUs; the cluster has 0"):
        cluster.check_capacity(3, 1.0, 0.5)
    with pytest.raises(EditError, match="CPUs"):
        cluster.check_capacity(8, 0.0, 1.0)


@pytest.mark.timeout(120)
def test_map_edits_returns_results_in_order_and_keeps_an_images_edits_together(served):
    from editing.serve.client import map_edits

    a, b = scene(seed=31), scene(seed=32)
    targets = [(40.0, 30.0), (44.0, 36.0), (38.0, 26.0)]
    reqs = [DragRequest(img, (((30.0, 32.0), t),), None, **FAST) for img, t in zip((a, b, a), targets)]
    out = map_edits(reqs, editor=served)
    assert [r.recipe["params"]["points"][0][1] for r in out] == [list(t) for t in targets]
    assert out[0].extra["served_by"] == out[2].extra["served_by"]  # a's two edits share a replica


@pytest.mark.timeout(180)
def test_a_replica_killed_mid_edit_is_retried_elsewhere_and_the_next_request_works(served):
    req = DragRequest(scene(seed=21), PAIR, None, **{**FAST, "lora_steps": 12})
    worker, out = _in_thread(lambda: served.edit(req))
    victim = _wait_running(served)
    time.sleep(0.5)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    worker.join(150)
    assert not worker.is_alive(), "the client hung on a dead replica"
    if "error" in out:  # the allowed alternative to a retry: one clear line
        assert isinstance(out["error"], EditError) and "replica running this edit stopped" in str(out["error"])
    else:
        r = out["result"]
        assert r.extra["served_by"] != victim and any("run again on another replica" in n for n in r.notices)
    nxt = served.edit(DragRequest(scene(seed=22), PAIR, None, **FAST))
    assert nxt.extra["served_by"] != victim


def test_toy_benchmark_on_the_pool_gives_the_in_process_rows(served):
    """bench.toy_drag --ray: the same scores as one process (timings aside), jobs spread over the replicas."""
    from bench import toy_drag

    keys = ("md", "success", "bg_psnr", "lost", "kept", "unet_calls")
    here = toy_drag.run_all(["instant"], 2, "tiny", {"instant": {"n_steps": 4}})
    pool = toy_drag.run_all(["instant"], 2, "tiny", {"instant": {"n_steps": 4}}, toy_drag.pooled(served))
    assert [[{k: r[k] for k in keys} for r in run["cases"]] for run in here] == \
        [[{k: r[k] for k in keys} for r in run["cases"]] for run in pool]
