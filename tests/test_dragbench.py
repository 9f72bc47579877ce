"""The DragBench evaluation runs end to end on a small fixture in DragBench's layout, and DIFT matches a point to itself.

The fixture is made here (odd sizes, a malformed pickle, a point outside the image, a mask of the
wrong size, an empty category); the tiny model edits and matches. Scores of random weights mean
nothing: only the layout, the per-sample errors and the summary counts are checked.
"""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bench import dragbench
from bench.dift import Dift
from editing.features import run_for_features
from editing.images import pil_to_tensor
from editing.sampling import add_noise
from tests.conftest import scene

FAST = ["--set", "lora_steps=1", "--set", "n_inference_steps=4", "--set", "inversion_strength=0.5", "--set", "max_steps=2", "--resolution", "64",
        "--model", "tiny", "--dift-model", "tiny", "--dift-ensemble", "2"]


def _sample(folder, w, h, points, mask_hw=None, meta_bytes=None, seed=0):
    folder.mkdir(parents=True)
    scene(w, h, seed).save(folder / "original_image.png")
    mh, mw = mask_hw or (h, w)
    mask = np.zeros((mh, mw), np.uint8)
    mask[mh // 4: 3 * mh // 4, mw // 4: 3 * mw // 4] = 1
    meta = {"prompt": "a red ball and a blue box", "points": points, "mask": mask}
    (folder / "meta_data.pkl").write_bytes(meta_bytes if meta_bytes is not None else pickle.dumps(meta))


@pytest.fixture
def bench_dir(tmp_path):
    data = tmp_path / "DragBench"
    _sample(data / "art" / "0_ok", 72, 50, [[20, 25], [30, 25]])
    _sample(data / "art" / "1_malformed", 72, 50, [[20, 25], [30, 25]], meta_bytes=b"this is not a pickle")
    _sample(data / "art" / "2_outside", 72, 50, [[20, 25], [100, 10]])
    _sample(data / "animals" / "0_mask_size", 50, 90, [[25, 40], [25, 55], [15, 20], [30, 20]], mask_hw=(45, 25), seed=1)
    (data / "empty").mkdir()
    return data


@pytest.fixture
def no_lpips(monkeypatch):
    def missing():
        raise ImportError("No module named 'lpips'")

    monkeypatch.setattr(dragbench, "_load_lpips", missing)


def test_dragbench_runs_reports_bad_samples_and_continues(bench_dir, tmp_path, no_lpips, capsys):
    out, js = tmp_path / "out", tmp_path / "report.json"
    rc = dragbench.main(["--data", str(bench_dir), "--method", "dragdiffusion", "--out", str(out), "--json", str(js), *FAST])
    assert rc == 0
    report = json.loads(js.read_text())

    s = report["summary"]
    assert (s["samples"], s["ok"], s["failed"], s["empty_categories"]) == (4, 2, 2, 1)
    assert s["pairs"] == 1 + 2 and s["md"] is not None and s["md"] >= 0
    assert s["if"] is None and report["lpips"]["available"] is False and "lpips" in report["lpips"]["reason"]
    assert report["request"] == {"lora_steps": 1, "n_inference_steps": 4, "inversion_strength": 0.5, "max_steps": 2}
    cats = report["categories"]
    assert (cats["art"]["ok"], cats["art"]["failed"], cats["animals"]["ok"], cats["empty"]["empty_categories"]) == (1, 2, 1, 1)

    rows = {(r["category"], r["sample"]): r for r in report["samples"]}
    assert "meta_data.pkl cannot be read" in rows["art", "1_malformed"]["error"]
    assert "outside the 72×50 image" in rows["art", "2_outside"]["error"]
    assert "no samples" in rows["empty", None]["error"]
    resized = rows["animals", "0_mask_size"]  # a wrong-size mask is resized with the engine's notice, not refused
    assert resized["error"] is None and any("mask was 25×45" in n for n in resized["notices"])
    for key in (("art", "0_ok"), ("animals", "0_mask_size")):
        r = rows[key]
        assert r["error"] is None and r["unet_calls"] > 0 and r["wall_s"] > 0 and r["if"] is None
        assert len(r["matched"]) == len(r["distances"]) == r["pairs"]
        assert r["md"] == pytest.approx(sum(r["distances"]) / r["pairs"])
        w, h = r["size"]
        assert all(0 <= x <= w - 1 and 0 <= y <= h - 1 for x, y in r["matched"])

    # Same layout as DragBench: the edited image at the original's size, meta_data.pkl beside it.
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [f"{c}/{n}/{f}" for c, n in (("animals", "0_mask_size"), ("art", "0_ok"))
                       for f in ("dragged_image.png", "meta_data.pkl")]
    assert Image.open(out / "art" / "0_ok" / "dragged_image.png").size == (72, 50)
    assert Image.open(out / "animals" / "0_mask_size" / "dragged_image.png").size == (50, 90)

    table = capsys.readouterr().out
    assert "| **all** | 4 | 2 | 2 | 3 |" in table and "unavailable" in table and "empty (no samples)" in table


def test_noop_baseline_with_lpips(bench_dir, tmp_path, monkeypatch):
    """Unchanged image: IF = 1 through the LPIPS path, MD ≈ the handle-target distance, no UNet calls."""
    class FakeLPIPS(torch.nn.Module):
        def forward(self, a, b):
            assert a.shape == b.shape == (1, 3, 224, 224)
            return (a - b).abs().mean().reshape(1, 1, 1, 1)

    monkeypatch.setattr(dragbench, "_load_lpips", FakeLPIPS)
    js = tmp_path / "noop.json"
    assert dragbench.main(["--data", str(bench_dir), "--method", "noop", "--out", str(tmp_path / "o"), "--json", str(js),
                           "--limit", "1", *FAST]) == 0
    report = json.loads(js.read_text())
    (row,) = report["samples"]
    assert (row["category"], row["sample"], row["unet_calls"]) == ("animals", "0_mask_size", 0)
    assert row["if"] == pytest.approx(1.0) and report["summary"]["if"] == pytest.approx(1.0)
    assert report["summary"]["samples"] == 1
    assert row["distances"] == pytest.approx([15.0, 15.0], abs=2.0)  # each handle is found where it is


def test_meta_reader_refuses_code_and_reads_numpy(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"prompt": "x", "points": [[1, 1], [2, 2]], "mask": Evil()}))
    with pytest.raises(dragbench.SampleError, match="not allowed"):
        dragbench.read_meta(p)
    assert not marker.exists()

    mask = (np.arange(12).reshape(3, 4) % 2).astype(np.uint8)
    for proto in (2, 4, 5):
        p.write_bytes(pickle.dumps({"prompt": "x", "points": [[np.int64(1), 2], [3, 4]], "mask": mask}, protocol=proto))
        meta = dragbench.read_meta(p)
        assert np.array_equal(meta["mask"], mask) and meta["points"][0][0] == 1
    old_numpy = pickle.dumps({"prompt": "x", "points": [[1, 2], [3, 4]], "mask": mask}, protocol=2)
    p.write_bytes(old_numpy.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))  # as numpy 1 wrote it
    assert np.array_equal(dragbench.read_meta(p)["mask"], mask)
    p.write_bytes(pickle.dumps({"prompt": "x", "points": [[1, 1]]}))
    with pytest.raises(dragbench.SampleError, match="no 'mask'"):
        dragbench.read_meta(p)


def test_bad_set_field_is_refused(bench_dir, capsys):
    with pytest.raises(SystemExit) as e:
        dragbench.main(["--data", str(bench_dir), "--method", "noop", "--set", "steps=3"])
    assert e.value.code == 2 and "no chosen method has a field 'steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dragbench.main(["--data", str(bench_dir), "--method", "noop", "--set", "lora_steps=-1"])


def test_dift_matches_an_image_to_itself():
    dift = Dift("tiny", ensemble=2)
    img = scene(128, 96)  # fed at its own size, as the official evaluation: a 6×8 feature map (16 px per cell)
    feats = dift.features(img, "a red ball")
    assert feats.shape[0] == 1 and feats.shape[-2:] == (6, 8)
    # Inside the outermost cell centres (bilinear upsampling is flat beyond them).
    points = [(45, 48), (96, 29), (64, 70), (30.5, 20.25)]
    for (x, y), (mx, my) in zip(points, dift.match(img, points, img.copy(), "a red ball")):
        assert math.dist((x, y), (mx, my)) <= 2.0


# ---- the official protocol ----------------------------------------------------------------------
def test_edited_image_is_scored_at_the_source_size_resized_bilinear():
    """drag_bench_evaluation/ resizes the dragged image to the source's size with PIL bilinear first."""
    edited = scene(64, 64, seed=3)
    got = dragbench.to_source_size(edited, (72, 50))
    assert got.size == (72, 50)
    assert np.array_equal(np.asarray(got), np.asarray(edited.resize((72, 50), Image.BILINEAR)))
    assert not np.array_equal(np.asarray(got), np.asarray(edited.resize((72, 50), Image.LANCZOS)))
    same = scene(72, 50)
    assert np.array_equal(np.asarray(dragbench.to_source_size(same, (72, 50))), np.asarray(same))  # untouched


def test_md_is_the_mean_over_all_points_not_over_images():
    one = dragbench.Row("a", "0", pairs=1, md=9.0, distances=[9.0], wall_s=1.0, unet_calls=0)
    three = dragbench.Row("a", "1", pairs=3, md=1.0, distances=[0.0, 1.0, 2.0], wall_s=1.0, unet_calls=0)
    failed = dragbench.Row("b", "0", error="broken")
    s = dragbench.aggregate([one, three, failed])
    assert s["md"] == pytest.approx((9 + 0 + 1 + 2) / 4)  # per image it would be (9 + 1) / 2 = 5
    assert (s["pairs"], s["ok"], s["failed"]) == (4, 2, 1)


def test_dift_draws_are_seeded_per_image_and_sample_the_posterior():
    """Seed 42 by default; a sample's features do not depend on what was scored before it (order-free)."""
    dift = Dift("tiny", ensemble=2)
    assert (dift.seed, dift.t, dift.block, dift.ensemble) == (42, 261, 1, 2)
    a, b = scene(72, 50), scene(72, 50, seed=5)
    fa = dift.features(a, "x")
    dift.features(b, "x")
    assert torch.equal(dift.features(a, "x"), fa)
    other = Dift("tiny", ensemble=2, seed=43).features(a, "x")
    assert not torch.allclose(other, fa)  # the seed is used
    # The posterior is sampled (as latent_dist.sample() in the official featurizer), not its mean:
    # rebuilt here from the diffusers parts, the sampled version matches and the mean does not.
    bu = dift.bundle
    post = bu.vae.encode(pil_to_tensor(a).to(bu.device, bu.dtype)).latent_dist
    gen = torch.Generator("cpu").manual_seed(42)
    draws, noise = (torch.randn((2, *post.mean.shape[1:]), generator=gen) for _ in range(2))
    alpha = bu.scheduler.alphas_cumprod[261].float()

    def feats_of(z0):
        z_t = add_noise(z0 * bu.vae.config.scaling_factor, noise, alpha)
        _, f = run_for_features(bu.unet, z_t, torch.tensor(261), bu.encode_prompt("x"), blocks=(1,))
        return f[1].float().mean(0, keepdim=True)

    assert torch.allclose(feats_of(post.mean + post.std * draws), fa, atol=1e-5)
    assert not torch.allclose(feats_of(post.mean.expand(2, -1, -1, -1)), fa, atol=1e-5)


@pytest.mark.parametrize("method", ["gooddrag", "diffeditor", "dragondiffusion", "instant", "region"])
def test_every_method_runs_on_dragbench(method, tmp_path, no_lpips):
    """Each method of the shared table edits a DragBench sample (2 pairs, an odd size, a wrong-size mask) and is scored."""
    from bench import methods as bm

    data = tmp_path / "bench"
    _sample(data / "animals" / "0_mask_size", 50, 90, [[25, 40], [25, 55], [20, 30], [30, 30]], mask_hw=(45, 25), seed=1)
    table = bm.fields(method)
    short = {"lora_steps": 1, "n_inference_steps": 4, "inversion_strength": 0.5, "max_steps": 2}
    sets = [a for k, v in short.items() if k in table for a in ("--set", f"{k}={v}")]
    js = tmp_path / "r.json"
    argv = ["--data", str(data), "--method", method, "--out", str(tmp_path / "o"), "--json", str(js),
            "--model", "tiny", "--dift-model", "tiny", "--dift-ensemble", "2", "--resolution", "64", *sets]
    assert dragbench.main(argv) == 0
    report = json.loads(js.read_text())
    (row,) = report["samples"]
    assert row["error"] is None and row["unet_calls"] > 0 and len(row["distances"]) == row["pairs"] == 2
    assert report["method"] == method and report["summary"]["pairs"] == 2
    assert Image.open(tmp_path / "o" / "animals" / "0_mask_size" / "dragged_image.png").size == (50, 90)


def test_scores_do_not_depend_on_the_order_samples_run_in(bench_dir, tmp_path, no_lpips):
    """The evaluate seam (a worker pool replaces it): samples run backwards give the same report."""
    def backwards(samples, ctx):
        return list(reversed(dragbench.evaluate(list(reversed(samples)), ctx)))

    reports = []
    for name, fn in (("fwd", None), ("bwd", backwards)):
        js = tmp_path / f"{name}.json"
        argv = ["--data", str(bench_dir), "--method", "noop", "--out", str(tmp_path / name), "--json", str(js), *FAST]
        assert dragbench.main(argv, evaluate_fn=fn) == 0
        reports.append(json.loads(js.read_text()))
    fwd, bwd = reports
    assert [(r["category"], r["sample"], r["distances"]) for r in fwd["samples"]] == \
           [(r["category"], r["sample"], r["distances"]) for r in bwd["samples"]]
    assert fwd["summary"] == bwd["summary"] and fwd["summary"]["empty_categories"] == 1
