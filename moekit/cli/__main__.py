"""``python -m moekit.cli``: the same as the ``moekit`` command."""

import sys

from moekit.cli import main

sys.exit(main())
