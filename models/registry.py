"""What a web request may name for a model-like field: names, never paths.

A person on the web names a ControlNet, T2I-Adapter, IP-Adapter, base model or VAE by a name from this registry:
the built-in names (``tiny``), a few well-known Hub ids, and the entries of the models folders the operator
listed (``--models-dir``, default the project's ``models/``), each by its folder (or file) name. The folders are
scanned once, when the registry is built, one level deep: nothing a request sends ever reaches the filesystem,
and an unknown name gets the same one-line answer whether or not such a path exists on the server.

The command line and the library keep taking local paths (``models/adapters.py``): that is the operator's own
machine. LoRAs are named by their library name (``editing/lora_library``), the same rule.

    names = scan([Path("models")], allow_hub=False)
    spec = names.resolve("controlnet", "lllyasviel/sd-controlnet-canny")   # -> the spec the engine loads
    names.choices("controlnet")                                          # -> what a dropdown offers
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import EditError

log = logging.getLogger(__name__)

PROJECT_MODELS = Path(__file__).resolve().parent  # the default --models-dir
KINDS = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter", "ip_adapter": "IP-Adapter", "model": "model",
         "vae": "VAE"}
BUILT_IN = {"controlnet": ("tiny",), "t2i_adapter": ("tiny",), "ip_adapter": ("tiny",),
            "model": ("toy", "tiny", "cpu-small"), "vae": ()}
# Public checkpoints for SD-1.5 that people ask for by name; any other Hub id needs the operator's --allow-hub-models.
KNOWN_HUB = {
    "controlnet": ("lllyasviel/sd-controlnet-canny", "lllyasviel/sd-controlnet-scribble",
                   "lllyasviel/sd-controlnet-depth", "lllyasviel/sd-controlnet-openpose",
                   "lllyasviel/control_v11p_sd15_canny", "lllyasviel/control_v11p_sd15_scribble"),
    "t2i_adapter": ("TencentARC/t2iadapter_color_sd14v1", "TencentARC/t2iadapter_canny_sd14v1",
                    "TencentARC/t2iadapter_sketch_sd14v1", "TencentARC/t2iadapter_depth_sd14v1"),
    "ip_adapter": ("h94/IP-Adapter",),
    "model": ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    "vae": ("stabilityai/sd-vae-ft-mse",),
}
# diffusers' config.json "_class_name" -> the kind of field that may name the folder
CLASS_KIND = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i_adapter", "AutoencoderKL": "vae"}
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
SHOWN = 12  # choices listed in a refusal; the rest are "…"


@dataclass(frozen=True)
class ModelNames:
    """name -> engine spec for each kind; ``allow_hub``: any well-formed Hub id is accepted too."""

    entries: dict[str, dict[str, str]] = field(default_factory=dict)
    allow_hub: bool = False

    def choices(self, kind: str) -> list[str]:
        return list(self.entries.get(kind, {}))

    def resolve(self, kind: str, name) -> str:
        """The spec the engine loads for ``name``, or EditError naming only what was typed and what may be chosen.
        A dict lookup (and, with ``allow_hub``, a pattern match): the filesystem is never consulted."""
        what = KINDS[kind]
        typed = name.strip() if isinstance(name, str) else name
        known = self.entries.get(kind, {})
        if isinstance(typed, str) and typed in known:
            return known[typed]
        if self.allow_hub and isinstance(typed, str) and HUB_ID.fullmatch(typed) and ".." not in typed:
            return typed
        shown = _shown(typed)
        options = ", ".join(list(known)[:SHOWN]) + (", …" if len(known) > SHOWN else "")
        hub = " (or any Hub id owner/name)" if self.allow_hub else ""
        raise EditError(f"Unknown {what} {shown}. Choose one of: {options or 'none on this server'}{hub}.")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def scan(dirs=(PROJECT_MODELS,), allow_hub: bool = False) -> ModelNames:
    """Build the registry: built-ins, known Hub ids, and the direct entries of each folder in ``dirs`` (one level;
    a folder's config says what it is). Later folders do not override earlier names; built-ins win over both."""
    entries = {kind: {n: n for n in BUILT_IN[kind]} for kind in KINDS}
    for kind, ids in KNOWN_HUB.items():
        entries[kind].update({i: i for i in ids})
    for d in dirs:
        d = Path(d).expanduser().resolve()
        if not d.is_dir():
            log.warning("models folder %s does not exist; no models from it", d)
            continue
        for child in sorted(d.iterdir()):
            kind = _kind_of(child)
            if kind is None:
                continue
            for k, spec in kind:
                entries[k].setdefault(child.name if k != "ip_adapter" else f"{child.name}/{Path(spec).name}", spec)
    return ModelNames({k: dict(v) for k, v in entries.items()}, allow_hub)


def _kind_of(child: Path) -> list[tuple[str, str]] | None:
    """[(kind, spec)] that ``child`` (an entry of a models folder) offers, or None."""
    if child.name.startswith((".", "_")):
        return None
    if child.is_file():
        return [("model", str(child))] if child.suffix.lower() == ".safetensors" else None
    if not child.is_dir():
        return None
    if (child / "model_index.json").is_file():
        return [("model", str(child))]
    if (child / "image_encoder").is_dir():  # an IP-Adapter folder: its weight files next to their encoder
        return [("ip_adapter", str(f)) for f in sorted(child.glob("*.safetensors"))] or None
    try:
        name = json.loads((child / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    kind = CLASS_KIND.get(name)
    return [(kind, str(child))] if kind else None
