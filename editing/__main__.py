"""``python -m editing ...`` (see editing/cli/)."""
import sys

from editing.cli import main

sys.exit(main())
