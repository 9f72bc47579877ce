"""The input policy at the engine's boundary (editing/images.py, editing/checks.py): the declared size is
checked before decoding, every mode PIL opens becomes correct RGB (or a clear refusal), and every numeric
field of every request refuses text, NaN, ±inf, fractions for whole numbers and out-of-range values with one
line naming the field, its range and what was sent."""
import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from editing import images
from editing.drag import DragRequest, GuidedDragRequest, IdentityLoraRequest
from editing.images import MAX_PIXELS, load_image, load_mask, read_recipe
from editing.requests import MoveRequest
from models.errors import EditError
from tests.conftest import scene


def declared_png(w: int, h: int, mode: str = "1") -> bytes:
    """A small real PNG whose header declares ``w``×``h`` (IHDR rewritten, CRC fixed): what a bomb looks like
    to a reader that trusts the header. Its pixel data are those of a 16×16 picture, so it is never decodable
    at the declared size — a reader that decodes before checking fails, or hangs, instead of refusing."""
    buf = io.BytesIO()
    Image.new(mode, (16, 16)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def real_bomb_png(side: int) -> bytes:
    """A genuine 1-bit PNG of ``side``² pixels, all black, compressed to a few KB (the issue's 17 KB file)."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


# ---- 1. size policy: refused from the header, fast -------------------------------------------------------
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the test's own lazy Image.open
@pytest.mark.parametrize("side, kind", [(12000, "over our limit, under PIL's bomb guard"),
                                        (20000, "a decompression bomb for PIL")])
def test_huge_declared_image_is_refused_from_its_header_fast(tmp_path, side, kind):
    path = tmp_path / "huge.png"
    path.write_bytes(real_bomb_png(side))
    assert path.stat().st_size < 100_000
    lazily = [] if side * side > 2 * Image.MAX_IMAGE_PIXELS else [Image.open(path)]  # PIL opens only one of them
    for src in (path, str(path), path.read_bytes(), *lazily):
        t0 = time.perf_counter()
        with pytest.raises(EditError) as e:
            load_image(src)
        elapsed = time.perf_counter() - t0
        msg = str(e.value)
        assert "\n" not in msg and f"{MAX_PIXELS / 1e6:g} MP" in msg, kind
        assert elapsed < 5.0, f"{kind}: refused after {elapsed:.2f} s"
    # the requests refuse it the same way (a lazily opened PIL image is never decoded)
    with pytest.raises(EditError, match="limit"):
        DragRequest(lazily[0] if lazily else path, [((1, 1), (5, 5))])
    with pytest.raises(EditError, match="limit"):
        load_mask(path)


def test_header_is_checked_before_any_decoding(tmp_path):
    """A file whose header declares 9000×9000 but holds 16×16 pixels: refused by size, not by a decode error."""
    path = tmp_path / "liar.png"
    path.write_bytes(declared_png(9000, 9000))
    with pytest.raises(EditError, match=r"9000×9000 \(81\.0 MP\); the limit is"):
        load_image(path)


def test_arrays_are_checked_too():
    with pytest.raises(EditError, match="limit"):
        images.check_size((MAX_PIXELS // 1000 + 1, 1000))
    with pytest.raises(EditError, match="at least 8 px"):
        load_image(np.zeros((7, 100, 3), np.uint8))
    assert load_image(np.zeros((8, 100, 3), np.uint8)).size == (100, 8)


def test_unreadable_files_and_recipes_give_one_line(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(EditError, match="not a readable image"):
        load_image(junk)
    with pytest.raises(EditError, match="not a readable image"):
        read_recipe(junk)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(real_bomb_png(20000))
    with pytest.raises(EditError, match="limit"):
        read_recipe(bomb)
    good = tmp_path / "good.png"
    images.save_png_with_recipe(scene(), good, {"task": "drag"})
    assert read_recipe(good) == {"task": "drag"}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


# ---- 4. every mode PIL opens -----------------------------------------------------------------------------
def _saved(img: Image.Image, tmp_path, name: str, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_16_bit_grey_is_rescaled_not_white(tmp_path):
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    path = _saved(Image.fromarray(ramp), tmp_path, "deep.png")
    assert Image.open(path).mode.startswith("I")
    a = np.asarray(load_image(path))
    assert a.shape == (32, 64, 3)
    np.testing.assert_allclose(a[..., 0], np.rint(ramp / 257.0), atol=1)  # PIL's own convert gives 255 everywhere
    assert a.min() == 0 and a.max() >= 254
    # the same picture as a mask: bright half is the mask
    m = load_mask(path)
    assert m.shape == (32, 64) and 0.4 < m.mean() < 0.6


def test_32_bit_and_float_grey(tmp_path):
    f = np.linspace(0, 1, 32 * 16, dtype=np.float32).reshape(16, 32)
    a = np.asarray(load_image(Image.fromarray(f, "F")))
    assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255
    i = Image.fromarray((f * 1000 - 500).astype(np.int32), "I")  # another range: stretched
    b = np.asarray(load_image(i))
    assert b.min() == 0 and b.max() == 255


def test_cmyk_palette_transparency_la_rgba_become_rgb_on_white(tmp_path):
    base = scene(64, 48)
    cmyk = load_image(_saved(base.convert("CMYK"), tmp_path, "c.jpg", quality=95))
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, float) - np.asarray(base, float)).mean() < 12

    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 8, 16))
    p.info["transparency"] = 0  # index 0 transparent: the right half
    out = np.asarray(load_image(_saved(p, tmp_path, "p.png", transparency=0)))
    assert (out[:, :8] == (200, 0, 0)).all() and (out[:, 8:] == 255).all()

    alpha = np.zeros((16, 16), np.uint8)
    alpha[8:] = 255
    la = Image.merge("LA", (Image.new("L", (16, 16), 40), Image.fromarray(alpha)))
    out = np.asarray(load_image(_saved(la, tmp_path, "la.png")))
    assert (out[:8] == 255).all() and (out[8:] == 40).all()  # transparent top -> white; opaque bottom -> its grey

    rgba = base.convert("RGBA")
    rgba.putalpha(0)
    assert (np.asarray(load_image(rgba)) == 255).all()  # composited on white (not the hidden RGB values)
    # the requests take the same road: an RGBA picture given as a PIL image is composited on white too
    assert (np.asarray(DragRequest(rgba, [((1, 1), (9, 9))]).image) == 255).all()


def test_animation_gives_its_first_frame_and_exif_orientation_is_applied(tmp_path):
    frames = [Image.new("RGB", (32, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    opened = Image.open(gif)
    opened.seek(1)  # an image left on a later frame still gives frame 0
    for src in (gif, opened):
        a = np.asarray(load_image(src))
        assert a[..., 0].mean() > 200 and a[..., 2].mean() < 60

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    path = _saved(img, tmp_path, "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    expect = ImageOps.exif_transpose(Image.open(path))
    assert out.size == (20, 40) == expect.size
    assert np.abs(np.asarray(out, int) - np.asarray(expect.convert("RGB"), int)).max() <= 1
    assert np.asarray(out)[:10].mean() > 200  # the stripe is now on top, where a viewer shows it


def test_mask_modes(tmp_path):
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p.paste(1, (0, 0, 8, 16))
    assert load_mask(_saved(p, tmp_path, "m.png")).mean() == 0.5
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 16))  # alpha decides
    assert load_mask(rgba).mean() == 0.25
    with pytest.raises(EditError, match="not a readable image"):
        load_mask(io.BytesIO(b"junk").getvalue())


def test_unconvertible_mode_is_refused_with_its_name():
    lab = Image.new("LAB", (16, 16))
    try:
        rgb = load_image(lab)  # a Pillow that converts LAB is fine too
        assert rgb.mode == "RGB"
    except EditError as e:
        assert "LAB" in str(e) and "\n" not in str(e)


def test_deep_and_thin_sketches_are_not_blank():
    from editing.generation import SketchRequest

    a = np.full((64, 64), 60000, np.uint16)
    a[20:40, 10:50] = 3000  # a dark stroke on a light 16-bit page
    req = SketchRequest(load_image(Image.fromarray(a)))
    assert req.sketch.mode == "RGB"
    thin = np.full((8, 2048, 3), 255, np.uint8)
    thin[2:6, 100:1900] = (200, 30, 30)
    assert SketchRequest(load_image(thin)).sketch.size == (2048, 8)


# ---- 3. numbers ------------------------------------------------------------------------------------------
def _requests():
    from editing.dreambooth import PersonalizeRequest
    from editing.generation import GenerateRequest, SketchRequest

    img = scene(64, 64)
    box = np.zeros((64, 64), bool)
    box[20:40, 20:40] = True
    sketch = np.full((64, 64, 3), 255, np.uint8)
    sketch[10:20, 10:50] = 0
    return {
        "drag": lambda **kw: DragRequest(img, [((10, 10), (20, 20))], **kw),
        "guided": lambda **kw: GuidedDragRequest(image=img, points=[((10, 10), (20, 20))], **kw),
        "move": lambda **kw: MoveRequest(image=img, mask=box, offset=(5, 0), **kw),
        "identity": lambda **kw: IdentityLoraRequest(img, **kw),
        "generate": lambda **kw: GenerateRequest("a toy", **kw),
        "sketch": lambda **kw: SketchRequest(Image.fromarray(sketch), **kw),
        "personalize": lambda **kw: PersonalizeRequest((img, scene(64, 64, 1)), "dog", **kw),
    }


CASES = [  # (request, field, whole?)
    ("drag", "seed", True), ("drag", "n_inference_steps", True), ("drag", "lam", False),
    ("drag", "inversion_strength", False), ("guided", "seed", True), ("guided", "w_edit", False),
    ("guided", "energy_scale", False), ("guided", "sde_strength", False), ("guided", "guidance_scale", False),
    ("move", "w_inpaint", False), ("identity", "lora_steps", True), ("identity", "lora_lr", False),
    ("generate", "seed", True), ("generate", "n_inference_steps", True), ("generate", "guidance_scale", False),
    ("sketch", "strength", False), ("personalize", "steps", True), ("personalize", "seed", True),
    ("personalize", "lr", False),
]


@pytest.mark.parametrize("kind, name, whole", CASES, ids=[f"{k}.{n}" for k, n, _ in CASES])
def test_every_numeric_field_refuses_bad_values_with_one_line(kind, name, whole):
    make = _requests()[kind]
    bad = ["abc", "", float("nan"), float("inf"), -float("inf"), 1e12, -1e12, True, None, [1], "1e400"]
    if whole:
        bad.append(2.5)
    for value in bad:
        if value is None and kind in ("guided", "move", "identity"):
            continue  # None = the published (or the drag's) default in these requests, as documented
        with pytest.raises(EditError) as e:
            make(**{name: value})
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(name), (value, msg)
        assert "from" in msg or "outside [" in msg, msg  # the range
        if isinstance(value, float) and not math.isfinite(value):
            assert str(value) in msg  # what was sent: nan / inf / -inf


def test_numbers_sent_as_text_are_read():
    make = _requests()
    assert make["drag"](seed="12").seed == 12
    assert make["drag"](lam=" 0.5 ").lam == 0.5
    assert make["guided"](n_inference_steps="20").n_inference_steps == 20
    assert make["generate"](seed=7.0).seed == 7 and isinstance(make["generate"](seed=7.0).seed, int)


def test_the_issues_examples_give_the_promised_messages():
    make = _requests()
    with pytest.raises(EditError, match=r"^seed=1e\+12 is outside \[0, 2147483647\] \(a whole number\)"):
        make["drag"](seed=1e12)
    with pytest.raises(EditError, match=r"^n_inference_steps must be a whole number from 2 to 200 \(got 2\.5\)"):
        make["drag"](n_inference_steps=2.5)
    with pytest.raises(EditError, match=r"^w_edit must be a finite number from 0 to 20 \(got nan\)"):
        make["guided"](w_edit=float("nan"))
    with pytest.raises(EditError, match=r"^seed must be a number \(a whole number from 0 to 2147483647\), got 'abc'"):
        make["generate"](seed="abc")


def test_method_names_are_case_insensitive():
    make = _requests()
    assert make["guided"](method="DiffEditor").method == "diffeditor"
    assert make["guided"](method=" DragonDiffusion ").method == "dragondiffusion"
    with pytest.raises(EditError, match="Unknown method"):
        make["guided"](method="magic")


# ---- 9. personalize photos -------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [1, 7, 31])
def test_tiny_personalize_photos_are_refused(side):
    from editing.dreambooth import MIN_PHOTO_SIDE, PersonalizeRequest

    tiny = Image.new("RGB", (side, side), (200, 10, 10))
    with pytest.raises(EditError, match=rf"{side}×{side}; it must be at least {MIN_PHOTO_SIDE} px"):
        PersonalizeRequest((tiny, tiny), "dog")


def test_too_many_personalize_photos_are_refused():
    from editing.dreambooth import MAX_PHOTOS, PersonalizeRequest

    with pytest.raises(EditError, match=f"at most {MAX_PHOTOS}"):
        PersonalizeRequest(tuple(scene(32, 32, i) for i in range(MAX_PHOTOS + 1)), "dog")


def test_switches_sent_as_text_are_read_or_refused():
    from editing.dreambooth import PersonalizeRequest

    photos = (scene(64, 64), scene(64, 64, 1))
    assert PersonalizeRequest(photos, "dog", prior_preservation="false").prior_preservation is False
    assert PersonalizeRequest(photos, "dog", flip="Yes", crop=0).flip is True
    for bad in ("maybe", 2, float("nan"), None):
        with pytest.raises(EditError, match="flip must be true or false"):
            PersonalizeRequest(photos, "dog", flip=bad)
