"""``python -m orthoedit.cli``: the ``orthoedit`` executable."""

from . import entry

entry()
