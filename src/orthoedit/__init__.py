"""orthoedit: find a chat model's refusal direction and orthogonalize its weights against it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("orthoedit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
