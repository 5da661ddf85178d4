"""The Python API: every stage of the pipeline as one function of its config (docs/api.md).

Each function takes the stage's pydantic config, the same model that makes the command's
options and its recipe section (``MeasureConfig`` is ``orthoedit measure``'s options and a
recipe's ``measure:``), writes the stage's outputs as the command does, and returns what it
found. Errors are the library's own types (``orthoedit.errors``): ``BadInputError`` for a bad
input (one sentence saying what to do), ``CheckFailedError`` for a failed check.

    from orthoedit.api import MeasureConfig, measure
    result = measure(MeasureConfig(model="./my-model", out=Path("direction")))

Importing this module loads no torch: each function imports its stage when it is called.
``log`` receives the lines the command would print; ``progress`` (``orthoedit.progress``)
the steps its progress bar would show.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import (
    ApplyConfig,
    AttributeConfig,
    CompareConfig,
    EvalBenchConfig,
    EvalKLConfig,
    EvalSafetyConfig,
    ExportGgufConfig,
    MeasureConfig,
    PushConfig,
    SearchConfig,
    StudySitesConfig,
    VerifyConfig,
)
from .errors import BadInputError, CheckFailedError, OrthoeditError
from .progress import Progress

if TYPE_CHECKING:
    from .edit.plan import Plan
    from .evaluate.bench import BenchResult
    from .evaluate.compare import Pair
    from .evaluate.kl import DamageReport
    from .evaluate.safety import SafetyResult
    from .export.gguf import GgufExport
    from .measure.candidates import MeasureResult
    from .publish import PushResult
    from .research.attribute import Attribution
    from .research.sites import SitesResult
    from .search.loop import SearchResult
    from .verify import VerifyReport

Log = Callable[[str], None]

__all__ = [
    "ApplyConfig",
    "AttributeConfig",
    "BadInputError",
    "CheckFailedError",
    "CompareConfig",
    "EvalBenchConfig",
    "EvalKLConfig",
    "EvalSafetyConfig",
    "ExportGgufConfig",
    "MeasureConfig",
    "OrthoeditError",
    "Progress",
    "PushConfig",
    "SearchConfig",
    "StudySitesConfig",
    "VerifyConfig",
    "apply",
    "attribute",
    "compare",
    "eval_bench",
    "eval_kl",
    "eval_safety",
    "export_gguf",
    "measure",
    "push",
    "run",
    "search",
    "study_sites",
    "verify",
]


def measure(
    cfg: MeasureConfig, log: Log = print, progress: Progress | None = None
) -> MeasureResult:
    """Find the refusal direction: every candidate measured and scored, the chosen one written
    to ``cfg.out`` (``direction.safetensors`` and the rest of the measure folder). Raises
    ``CheckFailedError`` (after writing every score) when no candidate passes."""
    from .measure.candidates import measure as run_measure

    return run_measure(cfg, log=log, progress=progress)


def search(cfg: SearchConfig, log: Log = print, progress: Progress | None = None) -> SearchResult:
    """Search the edit against measured refusal and damage, from a measure folder
    (``cfg.candidates``); run, resume or join the study and write ``pareto.*`` and ``chosen/``
    (``chosen/direction.safetensors`` and ``chosen/scales.json`` are apply's inputs)."""
    from .search.loop import search as run_search

    return run_search(cfg, log=log, progress=progress)


def apply(cfg: ApplyConfig) -> tuple[Plan, Path | None]:
    """Write the edited checkpoint (streamed; no torch, no GPU): the executed plan and the
    output folder, or ``(plan, None)`` with ``dry_run``."""
    from .edit.apply import apply as run_apply

    return run_apply(cfg)


def verify(cfg: VerifyConfig, log: Log = print) -> VerifyReport:
    """Check an edited checkpoint against its source with the plan's hooks; the report's
    ``passed`` says whether every number is within its tolerance, ``failures`` which is not."""
    from .verify import verify as run_verify

    return run_verify(cfg, log=log)


def eval_bench(
    cfg: EvalBenchConfig, log: Log = print, progress: Progress | None = None
) -> BenchResult:
    """lm-eval on both models with the same settings, and the regression report."""
    from .evaluate.bench import eval_bench as run_bench

    return run_bench(cfg, log=log, progress=progress)


def eval_safety(
    cfg: EvalSafetyConfig, log: Log = print, progress: Progress | None = None
) -> SafetyResult:
    """Answers to harmful and harmless prompts, judged, and the safety report."""
    from .evaluate.safety import eval_safety as run_safety

    return run_safety(cfg, log=log, progress=progress)


def eval_kl(cfg: EvalKLConfig, log: Log = print) -> DamageReport:
    """First-token KL and cross-entropy on harmless prompts, base vs edited."""
    from .evaluate.kl import eval_kl as run_kl

    return run_kl(cfg, log=log)


def compare(cfg: CompareConfig, log: Log = print) -> list[Pair]:
    """Both models' answers to the same prompts, side by side, each with its verdict."""
    from .evaluate.compare import compare as run_compare

    return run_compare(cfg, log=log)


def study_sites(
    cfg: StudySitesConfig, log: Log = print, progress: Progress | None = None
) -> SitesResult:
    """Which sites must lose the direction: every run-time and weight-edit condition."""
    from .research.sites import study_sites as run_sites

    return run_sites(cfg, log=log, progress=progress)


def attribute(
    cfg: AttributeConfig, log: Log = print, progress: Progress | None = None
) -> Attribution:
    """Which heads and MLPs carry refusal, ranked and checked by patching."""
    from .research.attribute import attribute as run_attribute

    return run_attribute(cfg, log=log, progress=progress)


def export_gguf(
    cfg: ExportGgufConfig, log: Log = print, progress: Progress | None = None
) -> GgufExport:
    """GGUF files of an edited checkpoint, written by llama.cpp's own tools."""
    from .export.gguf import export_gguf as run_export

    return run_export(cfg, log=log, progress=progress)


def push(cfg: PushConfig, log: Log = print) -> PushResult:
    """Upload an edited checkpoint (and its reports and GGUF files) to the Hugging Face Hub."""
    from .publish import push as run_push

    return run_push(cfg, log=log)


def run(recipe_path: Path, out: Path, **options) -> dict:
    """Run (or resume) a recipe file into ``out``; returns ``run.json``'s content. Raises
    ``CheckFailedError`` after the last stage when verify failed or the benchmark regressed.
    ``options``: ``start``, ``only``, ``log``, ``progress``, ``on_stage``."""
    from .pipeline.run import run as run_recipe

    return run_recipe(Path(recipe_path), Path(out), **options)
