"""``python -m editing.personalize`` / ``accelerate launch -m editing.personalize``.

The code is editing/cli/personalize.py; ``main`` stays importable here (tests/test_dreambooth.py).
"""
import sys

from editing.cli.personalize import main

if __name__ == "__main__":
    sys.exit(main())
