"""Old import path of two CLI helpers, kept for tests/test_generation.py (the code: editing/cli/)."""
from editing.cli.drag import make_drag_ready  # noqa: F401
from editing.cli.generate import parse_unit  # noqa: F401
