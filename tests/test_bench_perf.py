"""The performance benchmark runs end to end on the tiny model and writes a JSON report of the documented shape.

Only the shape and the UNet-call bookkeeping are checked; timings are never asserted.
"""
import json

import pytest
import torch

from bench import perf

RUN_KEYS = {"mode", "first_s", "repeat_s", "repeat_ratio", "unet_calls", "unet_calls_repeat", "phases_first",
            "phases_repeat", "nfe_first", "nfe_repeat", "steps_run", "peak_mem_mb", "peak_cuda_mb"}


def test_perf_tiny_config_writes_report(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert perf.main(["--config", "tiny-test", "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    assert {"config", "device", "torch", "model_load_s", "runs"} <= report.keys()
    assert report["config"] == "tiny-test" and report["torch"] == torch.__version__
    runs = {r["mode"]: r for r in report["runs"]}
    assert list(runs) == list(perf.MODES)
    table = capsys.readouterr().out
    for r in runs.values():
        assert RUN_KEYS <= r.keys()
        assert r["first_s"] > 0 and r["repeat_s"] > 0 and r["repeat_ratio"] > 0
        assert r["unet_calls"] == sum(r["nfe_first"].values()) > 0
        assert r["peak_mem_mb"] > 0 and r["peak_cuda_mb"] is None
    for name in ("dragdiffusion", "dragdiffusion-nolora", "generated"):
        r = runs[name]
        assert r["unet_calls_repeat"] == sum(r["nfe_repeat"].values()) > 0
        assert {"lora", "inversion", "drag", "denoise", "decode", "other"} <= r["phases_first"].keys()
        assert r["steps_run"] == 2

    for name in ("diffeditor", "dragondiffusion", "move", "paste", "appearance"):  # guided modes (bench/modes_guided.py)
        r = runs[name]
        assert r["nfe_first"]["inversion"] > 0 and r["nfe_repeat"]["inversion"] == 0  # inversion + bank cached
        assert r["nfe_first"]["edit"] == r["nfe_repeat"]["edit"] > 0


    for name in ("instant", "region", "gooddrag"):  # the newer methods (bench/modes_drag.py), once installed
        r = runs[name]
        assert r["unet_calls"] > 0 and r["unet_calls_repeat"] == sum(r["nfe_repeat"].values()) > 0
    if "instant" in runs:  # no LoRA, no gradients, a short schedule: fewer UNet calls than DiffEditor
        assert runs["instant"]["unet_calls"] < runs["diffeditor"]["unet_calls"]
    # Wall-time ratios to DiffEditor in the same run (the speed target is one of them).
    ratios = report["ratios"]
    assert report["ratios_to"] == "diffeditor" and set(ratios) == set(runs)
    assert ratios["diffeditor"] == {"first": 1.0, "repeat": 1.0}
    for name, r in runs.items():
        assert ratios[name]["first"] == pytest.approx(r["first_s"] / runs["diffeditor"]["first_s"], rel=1e-3)
    assert "first wall / diffeditor" in table

    drag = runs["dragdiffusion"]
    assert drag["nfe_first"]["lora"] == 2 * 4  # 2 steps × batch 4
    assert drag["nfe_repeat"]["lora"] == drag["nfe_repeat"]["inversion"] == 0  # cached LoRA and inversion
    assert runs["dragdiffusion-nolora"]["nfe_first"]["lora"] == 0
    gen = runs["generated"]
    assert gen["nfe_first"]["lora"] == gen["nfe_first"]["inversion"] == 0
    assert gen["nfe_first"]["generate"] > 0 and "generate" not in gen["nfe_repeat"]

    assert "| dragdiffusion | first |" in table and "| generated | repeat |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the full benchmark")
def test_perf_gpu_config_refuses_without_cuda(capsys):
    assert perf.main(["--config", "sd15-full"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
