"""The command line end to end, in a subprocess, on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editing.images import read_recipe
from tests.conftest import scene

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--lora-steps", "2", "--n-inference-steps", "8", "--max-steps", "3"]


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "editing", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_drag_then_replay(tmp_path):
    scene(90, 60).save(tmp_path / "in.png")
    m = np.zeros((60, 90), np.uint8)
    m[10:50, 10:70] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    out, recipe = tmp_path / "out.png", tmp_path / "r.json"
    p = run("drag", "--image", str(tmp_path / "in.png"), "--points", "30,30>45,28", "--mask", str(tmp_path / "mask.png"),
            "--prompt", "a red disk", "--seed", "3", "--out", str(out), "--recipe", str(recipe), *FAST)
    assert p.returncode == 0, p.stderr
    assert "[    drag]" in p.stderr or "drag" in p.stderr  # progress on stderr
    assert Image.open(out).size == (90, 60)
    embedded = read_recipe(out)
    assert embedded["params"]["prompt"] == "a red disk" and json.loads(recipe.read_text())["params"]["seed"] == 3
    out2 = tmp_path / "again.png"
    p = run("replay", str(recipe), "--out", str(out2))
    assert p.returncode == 0, p.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))


def test_bad_inputs_exit_nonzero_with_one_line(tmp_path, capsys):
    from editing.cli import main

    scene().save(tmp_path / "in.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    img = str(tmp_path / "in.png")
    cases = [
        (["drag", "--image", img, "--points", "1,2>3"], "Cannot read point pair"),
        (["drag", "--image", img, "--points", "10,10>500,10"], "outside"),
        (["drag", "--image", img, "--points", "10,10>10,10"], "Every point is pinned"),
        (["drag", "--image", str(tmp_path / "junk.png"), "--points", "10,10>20,10"], "not a readable image"),
        (["drag", "--image", str(tmp_path / "nope.png"), "--points", "10,10>20,10"], "does not exist"),
        (["drag", "--image", img, "--points", "10,10>20,10", "--latent-lr", "nan"], "finite"),
        (["drag", "--image", img, "--points", "10,10>20,10", "--model", "nope"], "Unknown model"),
        (["replay", str(tmp_path / "missing.json")], "does not exist"),
        (["replay", img], "carries no DragCanvas recipe"),
    ]
    for args, words in cases:
        code = main([*args, "--model", "tiny"] if "--model" not in args else args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last, (args, last)


@pytest.mark.slow  # ~35 s: three guided edits through the CLI
def test_guided_commands_move_and_drag_method_then_replay(tmp_path):
    scene(64, 64).save(tmp_path / "in.png")
    m = np.zeros((64, 64), np.uint8)
    m[20:40, 12:30] = 255
    Image.fromarray(m).save(tmp_path / "obj.png")
    steps = ["--model", "tiny", "--n-inference-steps", "10"]
    out = tmp_path / "moved.png"
    p = run("move", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "obj.png"), "--offset", "10,-4",
            "--scale", "1.2", "--out", str(out), *steps)
    assert p.returncode == 0, p.stderr
    assert read_recipe(out)["task"] == "move" and Image.open(out).size == (64, 64)
    again = tmp_path / "again.png"
    p = run("replay", str(out), "--out", str(again))
    assert p.returncode == 0, p.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    out = tmp_path / "dragged.png"
    p = run("drag", "--method", "diffeditor", "--image", str(tmp_path / "in.png"), "--points", "20,30>32,30",
            "--mask", str(tmp_path / "obj.png"), "--energy-scale", "1.5", "--out", str(out), *steps)
    assert p.returncode == 0, p.stderr
    assert read_recipe(out)["params"]["energy_scale"] == 1.5


def test_guided_bad_inputs(tmp_path, capsys):
    from editing.cli import main

    scene(64, 64).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty.png")
    img, empty = str(tmp_path / "in.png"), str(tmp_path / "empty.png")
    cases = [
        (["move", "--image", img, "--mask", empty, "--offset", "5,0"], "empty"),
        (["move", "--image", img, "--mask", img, "--offset", "5"], "two numbers"),
        (["move", "--image", img, "--mask", img, "--offset", "5,0", "--scale", "-1"], "positive"),
        (["paste", "--image", img, "--ref", img, "--offset", "5,0"], "--ref-mask is required"),
        (["appearance", "--image", img, "--mask", img, "--ref", img], "--ref-mask is required"),
        (["drag", "--image", img, "--points", "10,10>20,10", "--energy-scale", "2"], "applies to --method diffeditor"),
        (["drag", "--method", "diffeditor", "--image", img, "--points", "10,10>20,10", "--lora-steps", "2"],
         "applies to --method dragdiffusion"),
    ]
    for args, words in cases:
        code = main([*args, "--model", "tiny"])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last, (args, last)


def test_bombs_and_non_images_exit_2_with_one_line(tmp_path, capsys):
    """Issue 13 #8: a decompression bomb, an over-limit picture and a non-image: status 2, one line, no traceback."""
    from editing.cli import main
    from tests.test_input_policy import real_bomb_png

    (tmp_path / "bomb.png").write_bytes(real_bomb_png(20000))
    (tmp_path / "big.png").write_bytes(real_bomb_png(12000))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    scene().save(tmp_path / "in.png")
    p = run("drag", "--image", str(tmp_path / "bomb.png"), "--points", "10,10>20,10", "--model", "tiny")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "limit of 50 MP" in p.stderr, p.stderr
    img = str(tmp_path / "in.png")
    cases = [
        (["drag", "--image", str(tmp_path / "big.png"), "--points", "10,10>20,10"], "12000×12000"),
        (["drag", "--image", img, "--mask", str(tmp_path / "bomb.png"), "--points", "10,10>20,10"], "limit"),
        (["replay", str(tmp_path / "junk.png")], "not a readable image"),
        (["replay", str(tmp_path / "bomb.png")], "limit"),
        (["drag", "--image", img, "--points", "10,10>20,10", *["--lora", "x"] * 9], "at most 8"),
        (["move", "--image", str(tmp_path / "bomb.png"), "--mask", img, "--offset", "5,0"], "limit"),
        (["sketch", "--sketch", str(tmp_path / "junk.png")], "not a readable image"),
    ]
    for args, words in cases:
        code = main([*args, "--model", "tiny"])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, err)
