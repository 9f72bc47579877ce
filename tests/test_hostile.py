"""Hostile input through the public API (issue 13): the real app (app.build, ``tiny`` model) in process on a free
port, driven through gradio_client with a generated matrix of bad values over every endpoint and every field.

Every case must end in a clear message (an oversized picture within a few seconds) (one line, not Gradio's generic "upstream Gradio app has raised an
exception", not "Unexpected error", no traceback) or a result, and never hang; a value that must be refused
(non-numbers, NaN/±Infinity, out of range, fractions for whole numbers, damaged or oversized pictures, server
paths as LoRAs, ...) must not be accepted. After each endpoint's cases a valid request must still succeed. The
counts (clear / accepted / accepted-bad / unclear / hangs) are printed and written to
``tests/artifacts/hostile_counts.json``. A small hypothesis run adds random values of every JSON type.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import scene
from tests.serving import free_port

log = logging.getLogger(__name__)
GENERIC = "upstream Gradio app has raised an exception"
HANG_S = 60  # a case still running after this is a hang
BIG_S = 5  # an oversized picture must be refused from its declared size, long before this (issue 13: ~1 s)
ARTIFACTS = Path(__file__).parent / "artifacts"


# ---- the served app --------------------------------------------------------------------------------------
@contextlib.contextmanager
def served_app(editor, outputs: Path, *extra: str, settings: dict | None = None):
    """app.build + launch in this process; yields (url, demo, args). Serving settings are reset afterwards, and
    the shared editor gets its trust back, so other test modules see what they expect."""
    import app
    from ui.history import configure

    args = app.parse_args(["--model", "tiny", "--outputs", str(outputs), "--port", str(free_port()), *extra])
    trusted = editor.trust_lora_paths
    demo = app.build(args, editor=editor, settings=settings)
    kwargs = app.launch_kwargs(args) | {"prevent_thread_lock": True, "quiet": True}
    try:
        _, url, _ = demo.launch(**kwargs)
        yield url, demo, args
    finally:
        demo.close()
        editor.trust_lora_paths = trusted
        configure(outputs=None, input_in_recipe=True, time_budget_s=0.0, temp_root=None)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from editing import lora_library as lib

    d = tmp_path_factory.mktemp("hostile-loras")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(lib.ENV_DIR, str(d))
        yield d


@pytest.fixture(scope="module")
def served(editor, lora_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("hostile-outputs")
    with served_app(editor, outputs, "--max-queued-per-session", "0") as (url, demo, args):
        yield SimpleNamespace(url=url, demo=demo, outputs=outputs)


@pytest.fixture(scope="module")
def client(served):
    return Client(served.url, verbose=False)


# ---- files, good and bad ---------------------------------------------------------------------------------
def png_declaring(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit PNG of w×h, all black: a few KB on disk whatever its declared size (a decompression bomb)."""
    row = b"\x00" + b"\x00" * ((w + 7) // 8)
    raw = zlib.compress(row * h, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-files")
    f = SimpleNamespace()
    f.image = str(d / "in.png")
    scene(96, 64).save(f.image)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:50, 10:60] = 255
    f.mask = str(d / "mask.png")
    Image.fromarray(mask).save(f.mask)
    sketch = np.full((64, 64), 255, np.uint8)
    sketch[20:44, 30:34] = 0
    f.sketch = str(d / "sketch.png")
    Image.fromarray(sketch).save(f.sketch)
    f.photos = []
    for i in range(3):
        p = d / f"photo{i}.png"
        scene(64, 64, seed=i).save(p)
        f.photos.append(str(p))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (d / "notes.txt").write_text("not an image")
    Image.new("RGB", (1, 1), "red").save(d / "one.png")
    Image.new("RGB", (7, 7), "red").save(d / "seven.png")
    (d / "evil.pt").write_bytes(b"\x80\x04\x95 pickle that would run code")
    f.bad = {"broken png": str(d / "broken.png"), "text file": str(d / "notes.txt"),
             "1x1 picture": str(d / "one.png"),
             "12000x12000 1-bit png": str(png_declaring(d / "big.png", 12000, 12000)),
             "20000x20000 bomb": str(png_declaring(d / "bomb.png", 20000, 20000))}
    f.seven = str(d / "seven.png")
    f.evil = str(d / "evil.pt")
    return f


# ---- valid requests, one per endpoint (seconds on the tiny model) -------------------------------------------
FAST_DRAG = dict(lora_steps=2, n_inference_steps=4, max_steps=3, instant_n_steps=2, region_n_steps=2)
PERSONALIZE_FAST = dict(steps=2, rank=2, prior_images=1, prior_steps=2, preview_steps=2, resolution=64,
                        preview_every=1, checkpoint_every=0)


def valid_requests(f) -> dict[str, dict]:
    img, mask = handle_file(f.image), handle_file(f.mask)
    return {
        "/drag": dict(image=img, mask=None, points="[[20, 30], [40, 30]]", prompt="", **FAST_DRAG),
        "/generate": dict(prompt="a red ball", seed=1, n_inference_steps=4),
        "/train_lora": dict(image=img, prompt="hostile", lora_steps=2),
        "/move": dict(image=img, mask=mask, dx=10, dy=0, scale=1.0, prompt="", method="DiffEditor", steps=4, seed=1),
        "/paste": dict(image=img, reference=img, reference_mask=mask, dx=5, dy=0, scale=1.0, prompt="",
                       method="DiffEditor", steps=4, seed=1),
        "/appearance": dict(image=img, mask=mask, reference=img, reference_mask=mask, prompt="",
                            method="DiffEditor", steps=4, seed=1),
        "/sketch": dict(sketch=handle_file(f.sketch), photo=None, prompt="a tree", negative_prompt="",
                        scribble_controlnet="", n_inference_steps=4),
        "/text_to_image": dict(prompt="a tree", negative_prompt="", units="[]", files=[], n_inference_steps=4,
                               width=64, height=64),
        "/personalize": dict(photos=[handle_file(p) for p in f.photos], class_noun="dog", identifier="", name=None,
                             prior_preservation=False, train_text_encoder=False, **PERSONALIZE_FAST),
        "/suggest_identifier": dict(class_noun="dog"),
        "/add_lora": None,  # no valid LoRA file here: every case of it must be refused
        "/mask_from_click": dict(image=img, clicks="33,32"),  # the red disk of scene(96, 64)
    }


# ---- the matrix ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def json_with_nan():
    """Let gradio_client send NaN/±Infinity as JSON's common extension (NaN, Infinity), as a raw HTTP client can:
    httpx itself refuses them."""
    real = httpx.post

    def post(url, *args, json=None, **kwargs):
        if json is not None:
            kwargs["content"] = _json.dumps(json, allow_nan=True)
            kwargs["headers"] = {**dict(kwargs.get("headers") or {}), "content-type": "application/json"}
        return real(url, *args, **kwargs)

    httpx.post = post
    try:
        yield
    finally:
        httpx.post = real


_json = json


def clear(message: str) -> bool:
    """One line a user can act on: not Gradio's generic text, not our 'Unexpected error', no traceback."""
    m = (message or "").strip()
    return bool(m) and "\n" not in m and GENERIC not in m and "Unexpected error" not in m \
        and "Traceback" not in m and len(m) < 500


def inputs_of(demo, api_name: str) -> list:
    """The non-State input components of ``api_name``, in the API's parameter order."""
    for fn in demo.fns.values():
        if fn.api_name == api_name.lstrip("/"):
            return [c for c in fn.inputs if not getattr(c, "stateful", False)]
    raise KeyError(api_name)


NAN, INF = float("nan"), float("inf")
NUMBER_CORE = (("text 'abc'", "abc"), ("NaN", NAN))  # every numeric field gets these ...
NUMBER_EXTRA = (("true", True), ("+Infinity", INF), ("-Infinity", -INF), ("-1e12", -1e12), ("empty list", []),
                ("object", {"x": 1}), ("text 'NaN'", "NaN"))  # ... and one of these, in turn


def number_cases(comp, turn: int):
    """(label, value, must be refused) for a numeric widget: its own bounds, whole numbers, JSON oddities."""
    name, (lo, hi, default, _) = getattr(comp, "dragcanvas_check", (comp.label, (comp.minimum, comp.maximum, None, "")))
    whole = getattr(comp, "precision", None) == 0 or (isinstance(default, int) and not isinstance(default, bool))
    cases = [(label, v, True) for label, v in NUMBER_CORE]
    cases.append(("above max" if hi is not None else "1e12", hi + 1 if hi is not None else 1e12, True))
    label, v = NUMBER_EXTRA[turn % len(NUMBER_EXTRA)]
    cases.append((label, v, True))
    if lo is not None and turn % 2:
        cases.append(("below min", lo - 1, True))
    if whole:
        cases.append(("fraction", (lo if lo is not None else 0) + 0.5, True))
    return cases


TEXT_CASES = (("a number", 12345), ("100k characters", "x" * 100_000), ("a list", ["a"]), ("an object", {"a": 1}))
TEXT_MUST = {  # fields where a bad text must be refused, with their own cases
    "points": (("garbage", "not points"), ("NaN point", "[[NaN, 30], [40, 30]]"), ("1e309", "[[1e309, 3], [4, 5]]"),
               ("a number", 12345), ("None", None)),
    "method": (("unknown method", "Magic"),),
    "units": (("not JSON", "{{"), ("unknown unit", '[{"kind": "nope"}]')),
    "class_noun": (("empty", ""),),
    "scribble_controlnet": (("unknown Hub id", "no-such-owner/no-such-model"), ("a server folder", "/etc")),
    "clicks": (("garbage", "not a click"), ("outside", "500,5"), ("background", "3,3"), ("unknown mode", "33,32:grow"),
               ("None", None)),
}
TEXT_MAY = {"method": (("lowercase", "diffeditor"),)}
LORA_CASES = (("server path", ["/etc/passwd"]), ("parent path", ["../loras/x"]), ("50 LoRAs", ["a"] * 50),
              ("unknown name", ["no-such-lora"]), ("a number", [3]), ("not a list", 5), ("bad weight", ["x@nan"]))
RADIO_CASES = (("unknown", "Magic", True), ("a number", 3, True), ("lowercase", "diffeditor", False))
CHECKBOX_CASES = (("text", "abc", False), ("a number", 2, False), ("None", None, False))
OPTIONAL_FILES = {"mask", "photo", "reference_mask"}


BIG_PICTURES = ("12000x12000 1-bit png", "20000x20000 bomb", "bomb")


def file_cases(name: str, f):
    cases = [(label, handle_file(path), not (name in OPTIONAL_FILES and label == "1x1 picture"))
             for label, path in f.bad.items()]
    if name == "file":
        cases.append(("pickle LoRA", handle_file(f.evil), True))
    return cases


def file_list_cases(name: str, f):
    one, broken = f.bad["1x1 picture"], f.bad["broken png"]
    must = name == "photos"
    return [("empty", [], must), ("two 1x1", [handle_file(one)] * 2, True), ("two 7x7", [handle_file(f.seven)] * 2,
            must), ("broken", [handle_file(broken)], True), ("bomb", [handle_file(f.bad["20000x20000 bomb"])], True),
            ("text", [handle_file(f.bad["text file"])], must)]


def param_names(client, api: str) -> list[str]:
    return [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
            ["named_endpoints"][api]["parameters"]]


def matrix(demo, names_of, f, full: bool = True) -> list[tuple[str, str, str, object, bool]]:
    """(endpoint, field, case, value, must be refused) over every field of every endpoint. ``full=False``: one
    case per field, the kinds taken in turn (every kind still appears across the fields): the default run."""
    import gradio as gr

    valid = valid_requests(f)
    out, turn = [], 0
    for api in valid:
        names, comps = names_of(api), inputs_of(demo, api)
        assert len(names) == len(comps), (api, names)
        for name, comp in zip(names, comps):
            if isinstance(comp, (gr.Number, gr.Slider)):
                cases = number_cases(comp, turn)
            elif isinstance(comp, gr.Dropdown):
                cases = [(label, v, True) for label, v in LORA_CASES]
            elif isinstance(comp, gr.Radio):
                cases = list(RADIO_CASES)
            elif isinstance(comp, gr.Checkbox):
                cases = list(CHECKBOX_CASES)
            elif isinstance(comp, gr.File) and comp.file_count == "multiple":
                cases = file_list_cases(name, f)
            elif isinstance(comp, (gr.File, gr.Image)):
                cases = file_cases(name, f)
            else:  # text
                must = TEXT_MUST.get(name, ()) if (api, name) != ("/suggest_identifier", "class_noun") else ()
                cases = [(label, v, True) for label, v in must]
                cases += [(label, v, False) for label, v in TEXT_MAY.get(name, ())]
                if not must:
                    cases += [(label, v, False) for label, v in TEXT_CASES]
            if not full:
                cases = [cases[turn % len(cases)]]
            turn += 1
            out += [(api, name, label, v, must) for label, v, must in cases]
    return out


def run_case(client, api: str, kwargs: dict, must_refuse: bool) -> tuple[str, str]:
    """(outcome, message): clear / accepted / accepted-bad / unclear / hang."""
    job = client.submit(**kwargs, api_name=api)
    try:
        job.result(timeout=HANG_S)
    except AppError as e:
        return ("clear" if clear(str(e)) else "unclear"), str(e)
    except TimeoutError:
        job.cancel()
        return "hang", ""
    except Exception as e:
        return "unclear", f"{type(e).__name__}: {e}"
    return ("accepted-bad" if must_refuse else "accepted"), ""


def request_for(valid: dict, api: str, field: str, value, f) -> dict:
    base = dict(valid[api] or {"file": handle_file(f.bad["text file"])})
    if "name" in base and base["name"] is None:
        base["name"] = f"hostile-{next(_NAMES)}"
    base[field] = value
    return base


_NAMES = iter(range(10**6))


def check_valid(client, api: str, valid: dict) -> None:
    if valid[api] is not None:
        request = dict(valid[api])
        if "name" in request and request["name"] is None:  # a new LoRA name each time: names are never overwritten
            request["name"] = f"hostile-{next(_NAMES)}"
        client.predict(**request, api_name=api)


def test_bad_input_matrix_over_every_endpoint_and_field(served, client, files):
    valid = valid_requests(files)
    full = os.environ.get("DRAGCANVAS_FULL_MATRIX") == "1"  # every case of every field: ~10 min on 2 cores
    cases = matrix(served.demo, lambda api: param_names(client, api), files, full)
    counts = {k: 0 for k in ("clear", "accepted", "accepted-bad", "unclear", "hang", "slow")}
    only = os.environ.get("DRAGCANVAS_MATRIX_APIS")  # e.g. "/drag,/move": a quicker look at some endpoints
    if only:
        cases = [c for c in cases if c[0] in only.split(",")]
    failures, t0, last_api, slow = [], time.monotonic(), None, []
    with json_with_nan():
        for api, field, label, value, must in cases:
            if api != last_api and last_api is not None:
                check_valid(client, last_api, valid)  # the endpoint still works after its bad cases
                log.info("matrix: %s done after %.1f s", last_api, time.monotonic() - t0)
            last_api = api
            t = time.monotonic()
            outcome, message = run_case(client, api, request_for(valid, api, field, value, files), must)
            took = time.monotonic() - t
            if outcome == "clear" and label in BIG_PICTURES and took > BIG_S:
                outcome = "slow"  # refused, but after decoding what it should never have decoded
            slow.append((took, f"{api} {field}={label} {outcome}"))
            counts[outcome] += 1
            if outcome in ("accepted-bad", "unclear", "hang", "slow"):
                failures.append(f"{api} {field}={label}: {outcome} {message[:160]!r}")
        check_valid(client, last_api, valid)
        check_valid(client, "/drag", valid)
    elapsed = time.monotonic() - t0
    summary = {"matrix": "full" if full else "one case per field", "cases": len(cases), **counts, "seconds": round(elapsed, 1),
               "endpoints": len({a for a, *_ in cases}), "fields": len({(a, f) for a, f, *_ in cases})}
    slowest = [f"{s:.2f} s {what}" for s, what in sorted(slow, reverse=True)[:15]]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "hostile_counts.json").write_text(json.dumps({"summary": summary, "failures": failures,
                                                               "slowest": slowest}, indent=1))
    print(f"\nhostile matrix: {summary}")  # the counts go into the note
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:60])
    assert counts["clear"] + counts["accepted"] == len(cases)


# ---- hypothesis: random JSON values in random fields -----------------------------------------------------------
def test_random_values_in_random_fields_get_a_clear_answer(served, client, files):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid = valid_requests(files)
    apis = [a for a in valid if valid[a] is not None and a != "/personalize"]  # personalize: seconds per accepted run
    values = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                       st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3))
    seen: list[str] = []
    names = {api: param_names(client, api) for api in apis}

    @settings(max_examples=int(os.environ.get("DRAGCANVAS_HYPOTHESIS_EXAMPLES", 25)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        from hypothesis import assume

        api = data.draw(st.sampled_from(apis))
        comps = dict(zip(names[api], inputs_of(served.demo, api)))
        field = data.draw(st.sampled_from(list(comps)))
        value = data.draw(values)
        numeric = getattr(comps[field], "dragcanvas_check", None) is not None
        must = _must_refuse_number(comps[field], value) if numeric else False
        assume(must or not numeric)  # a valid random number could mean minutes of work (400 LoRA steps)
        outcome, message = run_case(client, api, request_for(valid, api, field, value, files), must)
        seen.append(outcome)
        assert outcome in ("clear", "accepted"), f"{api} {field}={value!r}: {outcome} {message[:200]!r}"

    with json_with_nan():
        case()
    check_valid(client, "/drag", valid)
    print(f"\nhypothesis: {len(seen)} random cases: {', '.join(f'{k} {seen.count(k)}' for k in sorted(set(seen)))}")


def _must_refuse_number(comp, value) -> bool:
    """Whether a value sent to a numeric widget must be refused (anything but a finite in-range number, read as the
    engine does: text holding a number counts as that number)."""
    check = getattr(comp, "dragcanvas_check", None)
    if check is None:
        return False
    _, (lo, hi, default, _) = check
    whole = getattr(comp, "precision", None) == 0 or (isinstance(default, int) and not isinstance(default, bool))
    if value is None and default is None:
        return False
    if isinstance(value, bool):
        return True
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        return True
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        return True
    return whole and v != int(v)
