"""The offline lm-eval tasks orthoedit ships (installed as ``orthoedit.evals``).

Each ``*.yaml`` here is an lm-eval task whose ``data_files`` are relative to this folder;
``orthoedit eval bench`` rewrites them to absolute paths at run time, so the tasks work from
any working directory. ``generate.py`` writes the data.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
