"""orthoedit: find a chat model's refusal direction and orthogonalize its weights against it."""

# The one place the version lives (pyproject.toml reads it); no importlib.metadata at start-up.
__version__ = "0.1.0"
