"""Layer boundaries, read from the source with ``ast`` (nothing is imported to check them), and the shared
helpers that live at the bottom layer: the pickle policy, the LRU cache, the private-diffusers shims.

Layers (DESIGN.md): ui -> editing -> models. models/ imports none of editing, ui, bench; editing/ imports
neither ui nor bench (nor gradio); ui/ imports neither torch nor bench; editing/ has no import cycles.
"""
from __future__ import annotations

import ast
import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

from models.errors import EditError

ROOT = Path(__file__).resolve().parents[1]


# ---- the import graph, from the source ------------------------------------------------------------
def _module_name(path: Path) -> tuple[str, bool]:
    """``editing/lora.py`` -> ("editing.lora", False); ``editing/__init__.py`` -> ("editing", True)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _sources(package: str) -> dict[str, tuple[Path, bool]]:
    """Every module of ``package`` (sub-packages included): name -> (file, is package)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name, is_pkg = _module_name(path)
        out[name] = (path, is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, is_pkg: bool, known: set[str] = frozenset()) -> list[tuple[str, int]]:
    """(imported module, line) for every import that runs: module level, inside functions and classes, inside
    try/if; not under ``if TYPE_CHECKING:``. ``from pkg import name`` yields ``pkg.name`` when that is a module
    in ``known`` (importing a submodule that way runs it), and ``pkg`` for names that are not."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.extend((sub, node.lineno) for sub in subs)
            if len(subs) < len(node.names):  # some names are attributes of ``target`` itself
                found.append((target, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            found.append((node.args[0].value, node.lineno))  # importlib.import_module("editing.x") with a literal
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(package: str, forbidden: set[str]) -> list[str]:
    out = []
    for module, (path, is_pkg) in _sources(package).items():
        for target, line in _imports(path, module, is_pkg):
            if _top(target) in forbidden:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return out


def editing_graph() -> dict[str, dict[str, int]]:
    """editing module -> {editing module it imports: first line}, module- and function-level imports alike."""
    mods = _sources("editing")
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, (path, is_pkg) in mods.items():
        for target, line in _imports(path, module, is_pkg, set(mods)):
            if target in mods and target != module:
                graph[module].setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; [] when acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(sccs)


def _describe(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    inside = set(comp)
    edges = [f"{a.replace('.', '/')}.py:{line} -> {b}" for a in comp for b, line in sorted(graph[a].items()) if b in inside]
    return f"cycle among {', '.join(comp)}:\n    " + "\n    ".join(edges)


# ---- layer rules ----------------------------------------------------------------------------------
def test_models_imports_no_upper_layer():
    bad = _violations("models", {"editing", "ui", "bench", "gradio"})
    assert not bad, "models/ is the bottom layer; move what it needs down into models/:\n" + "\n".join(bad)


def test_editing_imports_neither_ui_nor_bench():
    bad = _violations("editing", {"ui", "bench", "gradio"})
    assert not bad, "editing/ must not import ui/, bench/ or gradio:\n" + "\n".join(bad)


def test_ui_imports_neither_torch_nor_bench():
    bad = _violations("ui", {"torch", "bench"})
    assert not bad, "ui/ talks to editing/ only (no torch kernels, no benchmarks):\n" + "\n".join(bad)


def test_only_editing_serve_imports_ray():
    bad = [v for pkg in ("models", "editing", "ui", "bench") for v in _violations(pkg, {"ray"})
           if not v.startswith("editing/serve/")]
    assert not bad, "Ray is optional (requirements-ray.txt): only editing/serve/ imports it:\n" + "\n".join(bad)


def test_editing_has_no_import_cycles():
    graph = editing_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in editing/ (module- and function-level imports):\n" + "\n".join(
        _describe(graph, c) for c in cycles)


def test_the_import_reader_sees_lazy_relative_and_submodule_imports(tmp_path, monkeypatch):
    """The checks above are only as good as the reader: it must see imports inside functions, resolve relative
    ones, count ``from pkg import submodule``, skip TYPE_CHECKING blocks, and find a two-module cycle."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    pkg = tmp_path / "editing"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ui\n"
                              "def f():\n    from editing import b\n")
    (pkg / "b.py").write_text("import importlib\nfrom . import a\nimportlib.import_module('editing.sub.c')\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..b import x\ndef g():\n    import bench.perf\n")
    graph = editing_graph()
    assert graph["editing.a"] == {"editing.b": 5} and graph["editing.b"] == {"editing.a": 2, "editing.sub.c": 3}
    assert graph["editing.sub.c"] == {"editing.b": 1}
    assert find_cycles(graph) == [["editing.a", "editing.b", "editing.sub.c"]]
    assert _violations("editing", {"ui", "bench"}) == ["editing/sub/c.py:3 imports bench.perf"]


# ---- private diffusers APIs: each shim runs on the tiny model, so an upgrade fails here by name -------
@pytest.fixture(scope="module")
def tiny():
    from models.loader import load_bundle

    return load_bundle("tiny", device="cpu")


@pytest.fixture(scope="module")
def ip_state(tiny):
    from models.adapters import _tiny_ip_weights

    return _tiny_ip_weights(tiny).state_dict


def test_private_ip_adapter_attn_processors(tiny, ip_state):
    from models import diffusers_private as dp

    procs = dp.ip_adapter_attn_processors(tiny.unet, ip_state)
    assert set(procs) == set(tiny.unet.attn_processors)
    cross = {n: p for n, p in procs.items() if n.endswith("attn2.processor")}
    assert cross and all(type(p).__name__.startswith("IPAdapterAttnProcessor") for p in cross.values())
    assert all(hasattr(p, "to_k_ip") and hasattr(p, "scale") for p in cross.values())


def test_private_ip_adapter_image_projection(tiny, ip_state):
    from models import diffusers_private as dp

    proj = dp.ip_adapter_image_projection(tiny.unet, ip_state["image_proj"])
    d = ip_state["image_proj"]["proj.weight"].shape[1]
    with torch.no_grad():
        tokens = proj(torch.randn(2, d))
    assert tokens.shape == (2, 4, tiny.unet.config.cross_attention_dim)


def test_private_ip_image_projection_install_is_used_by_the_unet_and_restored(tiny, ip_state):
    from models import diffusers_private as dp

    unet = tiny.unet
    before_proj, before_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    proj = dp.ip_adapter_image_projection(unet, ip_state["image_proj"])
    d = ip_state["image_proj"]["proj.weight"].shape[1]
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    procs_before = dict(unet.attn_processors)
    seen = []
    handle = proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:  # the IP processors read the (text, image tokens) pair that the projection makes the UNet pass
        unet.set_attn_processor(dp.ip_adapter_attn_processors(unet, ip_state))
        with dp.ip_image_projection_installed(unet, proj), torch.no_grad():
            assert unet.config.encoder_hid_dim_type == "ip_image_proj"
            out = unet(x, 10, encoder_hidden_states=text,
                       added_cond_kwargs={"image_embeds": [torch.randn(1, 1, d)]}).sample
    finally:
        handle.remove()
        unet.set_attn_processor(procs_before)
    assert out.shape == x.shape and seen, "the UNet did not read the image embeddings through the projection"
    assert unet.encoder_hid_proj is before_proj and unet.config.encoder_hid_dim_type == before_type


def test_private_lora_config_from_state_dict(tiny):
    from models import diffusers_private as dp

    key = "text_model.encoder.layers.0.self_attn.q_proj"
    width = tiny.text_encoder.config.hidden_size
    sd = {f"{key}.lora_A.weight": torch.zeros(2, width), f"{key}.lora_B.weight": torch.zeros(width, 2)}
    cfg = dp.lora_config_from_state_dict(sd, None, None, {f"{key}.lora_B.weight": 2}, is_unet=False)
    assert type(cfg).__name__ == "LoraConfig" and cfg.r == 2 and key in set(cfg.target_modules)


_MODEL_OBJECTS = {"unet", "vae", "text_encoder", "pipe", "pipeline", "scheduler", "controlnet", "adapter", "model"}


def test_private_diffusers_apis_only_in_the_shim_module():
    """Outside ``models/diffusers_private.py``, models/ reaches no underscore attribute of a diffusers object and
    imports nothing private or from diffusers' internal sub-packages."""
    bad = []
    for module, (path, _) in _sources("models").items():
        if module == "models.diffusers_private":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                if node.module != "diffusers" or any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{where} from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                if owner in _MODEL_OBJECTS:
                    bad.append(f"{where} {owner}.{node.attr}")
    assert not bad, "put private diffusers APIs behind a function in models/diffusers_private.py:\n" + "\n".join(bad)


# ---- the one pickle policy ------------------------------------------------------------------------
def test_pickle_files_are_refused_unless_allowed(tmp_path):
    from models.safety import check_weights_file

    class MyError(EditError):
        pass

    for name in ("w.bin", "w.CKPT", "w.pt", "w.pth", "models/ip-adapter_sd15.bin"):
        with pytest.raises(MyError, match=r"pickle.*--allow-pickle"):
            check_weights_file(tmp_path / name, False, "LoRA", MyError)  # judged by name: need not exist
        check_weights_file(tmp_path / name, True, "LoRA", MyError)
    check_weights_file(tmp_path / "w.safetensors", False)
    with pytest.raises(EditError, match="LoRA w.bin is a pickle checkpoint"):
        check_weights_file("w.bin", False, "LoRA")


def test_pickle_only_folders_are_refused_unless_allowed(tmp_path):
    from models.safety import check_weights_file

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(EditError, match="only pickle weights"):
        check_weights_file(tmp_path, False, "ControlNet")
    check_weights_file(tmp_path, True, "ControlNet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    check_weights_file(tmp_path, False, "ControlNet")  # the safetensors copy is what gets loaded


def test_every_layer_uses_the_one_pickle_policy():
    """No second copy of the rule: the loader, the adapters and the LoRA library all call models.safety."""
    from editing.lora_library import files as lora_files
    from models import adapters, loader, safety

    for mod in (loader, adapters, lora_files):
        src = Path(mod.__file__).read_text(encoding="utf-8")
        assert "check_weights_file(" in src, mod.__name__
        assert mod.PICKLE_SUFFIXES is safety.PICKLE_SUFFIXES, mod.__name__


# ---- the one LRU ----------------------------------------------------------------------------------
def test_lru_get_or_contract():
    from models.cache import LRU

    c, made = LRU(2), []

    def make(v):
        return lambda: made.append(v) or v

    assert c.get_or("a", make(1)) == (1, False)
    assert c.get_or("a", make(99)) == (1, True) and made == [1]
    assert c.get_or("b", make(2)) == (2, False)
    assert c.get_or("a", make(99)) == (1, True)  # a is now the most recent
    assert c.get_or("c", make(3)) == (3, False)  # evicts b, the least recent
    assert "b" not in c and "a" in c and "c" in c and len(c) == 2
    assert c.get_or("b", make(4)) == (4, False) and "a" not in c


def test_lru_get_put_clear_and_failed_make():
    from models.cache import LRU

    c = LRU(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a use: b becomes the least recent
    c.put("c", 3)
    assert list(c) == ["a", "c"] and c.get("b", "none") == "none"
    c.put("a", 10)  # replacing refreshes too
    c.put("d", 4)
    assert list(c) == ["a", "d"] and c.get("a") == 10
    with pytest.raises(RuntimeError):
        c.get_or("e", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert "e" not in c and len(c) == 2
    c.clear()
    assert len(c) == 0 and c.get("a") is None
    with pytest.raises(ValueError):
        LRU(0)


def test_bundle_cache_is_bounded(monkeypatch):
    from models import loader
    from models.cache import LRU

    loads = []
    monkeypatch.setattr(loader, "_cache", LRU(loader.BUNDLE_CACHE_SIZE))
    monkeypatch.setattr(loader, "_resolve", lambda spec, device, dtype, allow_pickle: loads.append(spec) or object())
    monkeypatch.setattr(loader, "_apply_policy", lambda bundle, offload: bundle)
    a = loader.load_bundle("a", device="cpu")
    assert loader.load_bundle("a", device="cpu") is a and loads == ["a"]
    for spec in ("b", "c"):
        loader.load_bundle(spec, device="cpu")
    assert loader.BUNDLE_CACHE_SIZE == 2 and len(loader._cache) == 2
    assert loader.load_bundle("a", device="cpu") is not a and loads == ["a", "b", "c", "a"]  # a was evicted


def test_prompt_cache_is_bounded(tiny):
    from models.cache import LRU
    from models.loader import PROMPT_CACHE_SIZE

    assert isinstance(tiny._prompt_cache, LRU) and tiny._prompt_cache.size == PROMPT_CACHE_SIZE
    e = tiny.encode_prompt("a red disk")
    assert tiny.encode_prompt("a red disk") is e


def test_adapter_cache_is_per_unet_and_dies_with_it():
    """Adapters are cached per base UNet object, not per ``id()``: an evicted bundle's id can be reused."""
    from types import SimpleNamespace

    from models import adapters

    b1, b2 = SimpleNamespace(unet=torch.nn.Linear(1, 1)), SimpleNamespace(unet=torch.nn.Linear(1, 1))
    x1 = adapters._cached(b1, "controlnet", "tiny", object)
    assert adapters._cached(b1, "controlnet", "tiny", object) is x1
    assert adapters._cached(b2, "controlnet", "tiny", object) is not x1
    ref = weakref.ref(b1.unet)
    del b1
    gc.collect()
    assert ref() is None and len(adapters._caches.get(b2.unet)) == 1


# ---- toy drag cases live in models/ (ui/examples.py may not import bench) ---------------------------
def test_drag_cases_moved_to_models_and_bench_still_has_them():
    from bench import toy_drag
    from models import toy_world

    assert toy_drag.make_cases is toy_world.make_cases and toy_drag.Case is toy_world.Case
    case = toy_world.make_cases(1)[0]
    assert isinstance(case, toy_world.Case) and case.mask.shape == (toy_world.SIZE, toy_world.SIZE)
    assert case.mask.dtype == bool and case.mask[int(case.handle[1]), int(case.handle[0])]


def test_the_private_peft_flag_we_reset_still_exists():
    """``models.diffusers_private.forget_peft_loaded`` resets diffusers' ``_hf_peft_config_loaded`` (set by
    ``PeftAdapterMixin``); a diffusers upgrade that renames it must fail here, not silently leave it set."""
    import inspect

    from diffusers.loaders import peft

    assert "_hf_peft_config_loaded" in inspect.getsource(peft)
