"""Which model to use, decided without loading one: is SD-1.5 to be had, is the trained ``toy`` model here,
what ``auto`` means on this machine (and the banner that says so), and a spec's family for the app's banner."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOY_DIR = Path(__file__).resolve().parent / "toy"
TOY_INPAINT_DIR = Path(__file__).resolve().parent / "toy-inpaint"  # only its unet/: the rest is toy's
INPAINTING = " inpainting"  # the label's tail for an inpainting model (families.Family.label adds the same)


def sd15_available(timeout_s: float = 5.0) -> tuple[bool, str]:
    """Can SD-1.5 be had? True when it is in the local cache or the Hub answers. Returns (ok, why)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(DEFAULT_HUB_MODEL, "unet/diffusion_pytorch_model.safetensors")
        if isinstance(hit, str) and os.path.exists(hit):
            return True, "cached"
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "HF_HUB_OFFLINE is set and the model is not cached"
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(DEFAULT_HUB_MODEL, timeout=timeout_s)
        return True, "downloadable"
    except Exception as e:
        return False, f"the Hugging Face Hub is unreachable ({type(e).__name__})"


def toy_available() -> bool:
    """The trained toy model ships in the repo (models/toy, fp16 safetensors) once training completed."""
    return (TOY_DIR / "model_index.json").is_file() and (TOY_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def toy_inpaint_available() -> bool:
    """The toy inpainting UNet (``python -m models.train_toy_inpaint``) ships beside ``toy``."""
    return toy_available() and (TOY_INPAINT_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def best_offline_builtin() -> str:
    """The most useful model that needs no network: the trained ``toy`` model when it is here, else ``tiny``."""
    return "toy" if toy_available() else "tiny"


def family_hint(spec: str) -> str | None:
    """The family label of a model spec without loading weights (built-ins, local folders, single files), for
    the app's banner; None when only loading can tell (a Hub id not yet cached)."""
    from models import families
    from models.loader import single_file_family, single_file_is_inpainting

    builtin = {"tiny-sdxl": "sdxl", "sdxl-random": "sdxl", "tiny-sd2-v": "sd2"}
    if spec == "tiny-inpaint":
        return families.LABELS["sd15"] + INPAINTING
    if spec in builtin or spec in ("toy", "tiny", "cpu-small", "sd15", "sd15-random"):
        return families.LABELS[builtin.get(spec, "sd15")]
    path = Path(spec).expanduser()
    try:
        if (path / "unet" / "config.json").is_file():
            cfg = SimpleNamespace(**json.loads((path / "unet" / "config.json").read_text()))
            inpaint = INPAINTING if families.is_inpainting(cfg) else ""
            return families.LABELS[families.family_of_unet_config(cfg)] + inpaint
        if path.is_file() and path.suffix == ".safetensors":
            return families.LABELS[single_file_family(path)] + (INPAINTING if single_file_is_inpainting(path) else "")
    except Exception:
        return None
    return None


@functools.lru_cache(maxsize=1)
def resolve_auto() -> tuple[str, str]:
    """``auto`` -> (spec, banner). The banner is empty when the real SD-1.5 is used."""
    ok, why = sd15_available()
    if ok:
        return DEFAULT_HUB_MODEL, ""
    builtin = best_offline_builtin()
    if builtin == "toy":
        return builtin, (
            f"Stable Diffusion 1.5 is not available ({why}), so DragCanvas runs the built-in offline model "
            "'toy': a small model trained on coloured shapes (64 px scenes like \"a red disk and a blue square on "
            "gray\"). Try the examples below the canvas. For real photos start with "
            f"--model {DEFAULT_HUB_MODEL} (or a local folder / .safetensors file)."
        )
    return builtin, (
        f"Stable Diffusion 1.5 is not available ({why}), so DragCanvas runs the built-in offline "
        f"model '{builtin}'. Its random weights make edits look like noise; start with "
        f"--model {DEFAULT_HUB_MODEL} (or a local folder / .safetensors file) for real edits."
    )
