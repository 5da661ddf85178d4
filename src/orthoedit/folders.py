"""The folders one stage writes and another reads, each a type: its file names are spelled
here and nowhere else (``tests/test_structure.py`` greps for them), its paths are properties,
and the parts of its formats that are not a format of their own (a direction file is
``model.direction``'s) are read and written here.

- ``MeasureFolder``: measure's ``--out``; search's ``--candidates``; the folder of a measured
  direction, where apply, study sites and attribute look for its record and scores.
- ``SearchFolder``: search's ``--out`` (the study, the Pareto front, ``chosen/``, ``confirm/``).
- ``RunFolder``: a recipe's run (one folder per stage's output, run.json, run.log).
- ``ReportFolder``: an evaluation's report (eval bench, eval safety, search --confirm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError

#: The harmful and harmless prompt sets, as measure's validation files name them.
KINDS = ("harmful", "harmless")


@dataclass(frozen=True)
class ReportFolder:
    """An evaluation's report: Markdown, JSON and a figure side by side (and eval safety's
    completions)."""

    path: Path

    @property
    def md(self) -> Path:
        return self.path / "report.md"

    @property
    def json(self) -> Path:
        return self.path / "report.json"

    @property
    def png(self) -> Path:
        return self.path / "report.png"

    @property
    def completions(self) -> Path:
        return self.path / "completions.jsonl"


@dataclass(frozen=True)
class MeasureFolder:
    """What ``orthoedit measure`` writes: the direction (``model.direction``'s format) and its
    record, the validation prompts, the scores and their plot (when candidates were scored),
    and every candidate with both means (``[n_layers, n_positions, d_model]``)."""

    path: Path

    @classmethod
    def of(cls, direction: str | Path) -> MeasureFolder:
        """The folder a direction file lies in (measure's, or any other)."""
        return cls(Path(direction).parent)

    @property
    def direction(self) -> Path:
        return self.path / "direction.safetensors"

    @property
    def record(self) -> Path:
        """direction.json: sources and hashes of the prompts, the choice, the placement."""
        return self.path / "direction.json"

    @property
    def candidates(self) -> Path:
        return self.path / "candidates.safetensors"

    @property
    def scores(self) -> Path:
        return self.path / "scores.json"

    @property
    def scores_png(self) -> Path:
        return self.path / "scores.png"

    def validation(self, kind: str) -> Path:
        """The held-out prompts of ``kind`` (harmful, harmless), as ``--harmful`` reads them."""
        return self.path / f"val-{kind}.jsonl"

    def missing(self) -> list[str]:
        """The files search reads that are not there."""
        needed = [self.candidates, self.direction, *(self.validation(k) for k in KINDS)]
        return [p.name for p in needed if not p.is_file()]

    def read_record(self) -> dict | None:
        """direction.json, or None where there is none."""
        if not self.record.is_file():
            return None
        try:
            return json.loads(self.record.read_text())
        except json.JSONDecodeError as err:
            raise BadInputError(f"{self.record}: not valid JSON ({err}).") from err

    def write_record(self, record: dict) -> None:
        self.record.write_text(json.dumps(record, indent=2) + "\n")

    def write_scores(self, scores: dict) -> None:
        self.scores.write_text(json.dumps(scores, indent=2) + "\n")

    def write_validation(self, kind: str, prompts: list[str]) -> None:
        """``{"prompt": ...}`` per line, in order: a prompt file ``--harmful``/``--harmless``
        read back exactly (ASCII-escaped JSON, so no prompt can contain a line break)."""
        lines = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        self.validation(kind).write_text(lines, encoding="utf-8")

    def write_candidates(self, candidates, harmful_mean, harmless_mean) -> None:
        """Each ``[n_layers, n_positions, d_model]`` array, stored in float32."""
        import numpy as np

        from .model.checkpoint import save_stable

        arrays = {
            "candidates": candidates,
            "harmful_mean": harmful_mean,
            "harmless_mean": harmless_mean,
        }
        save_stable(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
            self.candidates,
            {"layer_convention": "input of block i", "position_convention": "p - n_positions"},
        )

    def read_candidates(self, d_model: int, n_layers: int):
        """The candidates in float64, checked against the model's sizes (their values are
        the reader's to check)."""
        import numpy as np
        from safetensors import SafetensorError, safe_open

        path = self.candidates
        try:
            with safe_open(str(path), "np") as f:
                found = f.get_tensor("candidates").astype(np.float64)
        except (SafetensorError, OSError, KeyError) as err:
            raise BadInputError(f"{path}: cannot read its candidates ({err}).") from None
        if found.ndim != 3 or found.shape[0] != n_layers or found.shape[2] != d_model:
            raise BadInputError(
                f"{path}: candidates {list(found.shape)} do not fit the model "
                f"({n_layers} layers, hidden size {d_model}); measure this model first."
            )
        return found

    def read_harmless_mean(self, layer: int, position: int, d_model: int):
        """The harmless mean activation at (layer, position), in float64."""
        import numpy as np
        from safetensors import SafetensorError, safe_open

        path = self.candidates
        try:
            with safe_open(str(path), "np") as f:
                means = f.get_tensor("harmless_mean")
        except (SafetensorError, OSError, KeyError) as err:
            raise BadInputError(f"{path}: cannot read harmless_mean ({err}).") from None
        if means.ndim != 3 or means.shape[2] != d_model or not -means.shape[1] <= position < 0:
            raise BadInputError(f"{path}: harmless_mean {means.shape} does not fit the model.")
        vector = means[layer, means.shape[1] + position].astype(np.float64)
        if not np.isfinite(vector).all() or not np.any(vector):
            raise BadInputError(f"{path}: the harmless mean is zero or not finite.")
        return vector


@dataclass(frozen=True)
class ChosenFolder:
    """search's ``chosen/``: the chosen trial's direction and scales, the apply command that
    reproduces it, and a recipe fragment."""

    path: Path

    @property
    def direction(self) -> Path:
        return self.path / "direction.safetensors"

    @property
    def scales(self) -> Path:
        return self.path / "scales.json"

    @property
    def apply_command(self) -> Path:
        return self.path / "apply.txt"

    @property
    def recipe_fragment(self) -> Path:
        return self.path / "recipe-fragment.yaml"


@dataclass(frozen=True)
class SearchFolder:
    """What ``orthoedit search`` writes: the study (unless it is shared), the Pareto front,
    ``chosen/`` and, with ``--confirm``, ``confirm/``; a lock while a search runs."""

    path: Path

    @property
    def study(self) -> Path:
        return self.path / "study.db"

    @property
    def lock(self) -> Path:
        return self.path / ".search.lock"

    @property
    def pareto_json(self) -> Path:
        return self.path / "pareto.json"

    @property
    def pareto_md(self) -> Path:
        return self.path / "pareto.md"

    @property
    def pareto_png(self) -> Path:
        return self.path / "pareto.png"

    @property
    def chosen(self) -> ChosenFolder:
        return ChosenFolder(self.path / "chosen")

    @property
    def confirm(self) -> ReportFolder:
        """--confirm's report (eval safety's, on held-out prompts)."""
        return ReportFolder(self.path / "confirm")

    @property
    def confirm_model(self) -> Path:
        """The temporary checkpoint --confirm judges (removed after)."""
        return self.path / ".confirm-model"

    def outputs(self) -> list[Path]:
        """Everything a search writes besides the study and the lock."""
        pareto = [self.pareto_md, self.pareto_json, self.pareto_png]
        return [*pareto, self.chosen.path, self.confirm.path, self.confirm_model]


@dataclass(frozen=True)
class RunFolder:
    """What ``orthoedit run`` writes: one output per stage (``output``), run.json (the stages,
    their inputs and outputs hashed) and run.log."""

    path: Path

    @property
    def direction(self) -> MeasureFolder:
        return MeasureFolder(self.path / "direction")

    @property
    def search(self) -> SearchFolder:
        return SearchFolder(self.path / "search")

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def verify(self) -> Path:
        return self.path / "verify.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def bench(self) -> ReportFolder:
        return ReportFolder(self.eval / "bench")

    @property
    def safety(self) -> ReportFolder:
        return ReportFolder(self.eval / "safety")

    @property
    def kl(self) -> Path:
        return self.eval / "kl.json"

    @property
    def gguf(self) -> Path:
        return self.path / "gguf"

    @property
    def publish(self) -> Path:
        return self.path / "publish.json"

    @property
    def record(self) -> Path:
        """run.json."""
        return self.path / "run.json"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    def output(self, stage: str) -> Path:
        """The output of a recipe's stage (a folder or a file)."""
        outputs = {
            "direction": self.direction.path,
            "search": self.search.path,
            "model": self.model,
            "verify": self.verify,
            "bench": self.bench.path,
            "safety": self.safety.path,
            "kl": self.kl,
            "gguf": self.gguf,
            "publish": self.publish,
        }
        return outputs[stage]

    def reports(self) -> list[Path]:
        """The reports push publishes, in order (whether they exist or not)."""
        bench, safety = self.bench, self.safety
        return [bench.md, bench.json, bench.png, safety.json, safety.png, self.kl, self.verify]

    def relative(self, path: Path) -> str:
        """``path`` inside the run folder, as a POSIX path (as it is published)."""
        return path.relative_to(self.path).as_posix()
