"""The error types every layer shares. They live in ``models/`` (the bottom layer) so that model loading can
raise them without importing the engine; ``editing.requests`` re-exports them."""


class EditError(Exception):
    """A problem the user can act on. ``str(e)`` is one line, shown as is in the UI and CLI."""


class EditCancelled(EditError):
    """The user pressed Cancel; nothing was changed."""
