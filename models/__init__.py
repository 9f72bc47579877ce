"""Model resolution, loading, caching and device/dtype policy (see loader.py)."""
from models.loader import DEFAULT_HUB_MODEL, ModelBundle, ModelLoadError, load_bundle, resolve_auto

__all__ = ["DEFAULT_HUB_MODEL", "ModelBundle", "ModelLoadError", "load_bundle", "resolve_auto"]
