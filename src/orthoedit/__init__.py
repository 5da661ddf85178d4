"""orthoedit: find a chat model's refusal direction and orthogonalize its weights against it.

The Python API is ``orthoedit.api``: every stage (measure, search, apply, verify, eval_bench,
eval_safety, eval_kl, compare, study_sites, attribute, export_gguf, push, run) as a function
of its config (docs/api.md).
"""

# The one place the version lives (pyproject.toml reads it); no importlib.metadata at start-up.
__version__ = "0.1.0"
