"""Model resolution, loading, caching and device/dtype policy (see loader.py; choose.py decides what ``auto`` is)."""
from models.choose import DEFAULT_HUB_MODEL, resolve_auto
from models.loader import ModelBundle, ModelLoadError, load_bundle

__all__ = ["DEFAULT_HUB_MODEL", "ModelBundle", "ModelLoadError", "load_bundle", "resolve_auto"]
