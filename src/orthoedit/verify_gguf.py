"""What ``orthoedit verify`` does with GGUF files (docs/design.md §4, "GGUF").

- The edit of a GGUF (``apply`` wrote it; it carries ``orthoedit.plan``) is checked against its
  source GGUF by ``verify.verify`` itself (``verify_inputs`` reads the plan from the file):
  bytes, edited tensors along the basis, logits against the plan's hooks on the dequantized
  source in transformers, and, where llama-cpp-python is installed, in llama.cpp
  (``llama_cpp_check``).
- A GGUF exported from an edited folder (``export gguf``; no plan in it) is checked against
  that folder's model (``verify_export``): its logits in each reader. Every weight of it is
  rounded, not only the edited ones, so the bound takes ε √(2L) for L blocks (independent
  roundings of the 2L sublayers adding up as a random walk), or 2R where larger, R what
  rounding the folder's own weights to the file's types does (measured, the model in memory:
  a file of another model fails by its difference). transformers' logits are judged;
  llama.cpp's are reported: its own arithmetic has no measure here (no source GGUF to measure
  C on).

Tolerance from the types: one element of a GGML type rounds by at most ε = 2^-b relative to
its block's scale, b the significand bits of a float type, else the type's whole bits per
weight (Q8_0 2^-8, Q6_K 2^-6, Q4_K 2^-4, ...): ``type_format`` gives ``verify.quant_tolerance``
that ε (logits within 2ε of max(1, max |logit|), mean KL within 4ε²), for the coarsest type
the check depends on. llama.cpp computes in its own arithmetic (8-bit activations against
quantized matrices, a 16-bit cache), so its bound adds 2C, C being its own difference from
transformers on the source itself, measured in the same run. Where the edit is requantized,
verify measures R as for FP8 (``runtime.rounding.requantized_plainly``: the nearest rounding
of the exact projection in the written type, the hooks on) and allows 2R where it is larger.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import VerifyConfig
from .edit.gguf_check import PLAN_KEY, load_plan
from .edit.gguf_types import epsilon
from .edit.plan import Plan
from .errors import BadInputError
from .model.gguf import GgufCheckpoint, is_gguf, read_layout
from .model.quant import quant_format
from .model.source import read_config, resolve_model
from .output import check_file_target, inputs_of, write_file
from .verify_logits import compare, encode_prompts, logits, read_prompts


@dataclass(frozen=True)
class TypeFormat:
    """A GGML type as ``verify.quant_tolerance`` reads a quantized format."""

    method: str
    epsilon: float


def type_format(kind: str) -> TypeFormat:
    return TypeFormat(kind, epsilon(kind))


def verify_inputs(cfg: VerifyConfig):
    """(plan, the source's local path, its config, its quantized format): of a checkpoint
    folder's edit (plan.json), or of a GGUF's (its orthoedit.plan key; the source a GGUF)."""
    gguf = is_gguf(cfg.edited)
    plan = load_plan(cfg.edited) if gguf else Plan.load(cfg.edited)
    folder, _ = resolve_model(cfg.source, cfg.revision)
    if is_gguf(folder) != gguf:
        raise BadInputError(
            f"--edited {cfg.edited} and {cfg.source}: verify checks a GGUF's edit (a .gguf "
            "written by apply) against that GGUF, a checkpoint folder's against its folder."
        )
    config = read_config(folder)
    return plan, folder, config, None if gguf else quant_format(config, folder)


def is_export(cfg: VerifyConfig) -> bool:
    """Whether ``cfg`` checks an exported GGUF (no plan in it) against an edited folder."""
    return (
        is_gguf(cfg.edited)
        and not is_gguf(cfg.source)
        and Path(cfg.edited).is_file()
        and not isinstance(read_layout(Path(cfg.edited)).get(PLAN_KEY), str)
    )


@dataclass
class ReaderResult:
    reader: str
    max_logit_diff: float
    mean_kl: float
    own_max_logit_diff: float = 0.0  # C: this reader on the source vs transformers
    own_mean_kl: float = 0.0
    max_logit_bound: float = math.nan
    mean_kl_bound: float = math.nan


def _bound(result: ReaderResult, logit_bound: float, kl_bound: float) -> list[str]:
    """Judge one reader against the bounds widened by its own C: + 2C, + 4·C's KL."""
    result.max_logit_bound = logit_bound + 2 * result.own_max_logit_diff
    result.mean_kl_bound = kl_bound + 4 * result.own_mean_kl
    failures = []
    if result.max_logit_diff > result.max_logit_bound:
        failures.append(f"{result.reader}: max |Δlogit| {result.max_logit_diff:.3g} > "
                        f"{result.max_logit_bound:.3g}")  # fmt: skip
    if result.mean_kl > result.mean_kl_bound:
        failures.append(f"{result.reader}: mean KL {result.mean_kl:.3g} > "
                        f"{result.mean_kl_bound:.3g}")  # fmt: skip
    return failures


def llama_cpp_check(cfg, source: Path, inputs, base, ref, report, log) -> None:
    """The edited GGUF in llama.cpp against the hooks' logits ``ref``, its bound widened by
    C (llama.cpp on the source GGUF against transformers' ``base``); skipped, saying why,
    where llama-cpp-python is not installed."""
    from .runtime import llama_cpp

    if not llama_cpp.available():
        report.readers_skipped.append(f"llama.cpp: {llama_cpp.MISSING}")
        return
    log("running prompts through the edited GGUF and its source in llama.cpp")
    result = ReaderResult("llama.cpp", *compare(ref, llama_cpp.logits(Path(cfg.edited), inputs)))
    own = compare(base, llama_cpp.logits(Path(source), inputs))
    result.own_max_logit_diff, result.own_mean_kl = own
    # transformers' bounds (the types' ε, or 2R where measured), widened by llama.cpp's C
    report.failures += _bound(result, report.max_logit_bound, report.mean_kl_bound)
    report.readers.append(asdict(result))


@dataclass
class ExportReport:
    edited: str
    types: dict[str, int]  # GGML type -> matrices of that type in the file
    epsilon: float  # the coarsest type's ε × √(2L)
    prompts: int
    max_abs_logit: float = math.nan
    rounding_max_logit_diff: float = 0.0  # R: the checkpoint's own weights rounded to the types
    rounding_mean_kl: float = 0.0
    readers: list[ReaderResult] = field(default_factory=list)
    readers_skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _round_to_types(model, checkpoint: GgufCheckpoint) -> bool:
    """Every matrix of ``model`` the file holds, replaced in place by its nearest rounding in
    the file's type for it (the model is not used afterwards). Whether all could be."""
    import torch
    from gguf import GGMLQuantizationType, dequantize

    from .edit.gguf_types import NUMPY_TYPES, ggml, quantize

    for name, param in model.named_parameters():
        info = checkpoint.tensors.get(name)
        if info is None or param.ndim != 2 or info.dtype == "F32":
            continue
        if info.dtype not in NUMPY_TYPES and ggml() is None:
            return False  # a K-quant without llama.cpp's quantizer: R is not measured
        rows = param.detach().to("cpu", torch.float32).numpy()
        back = dequantize(quantize(rows, info.dtype), GGMLQuantizationType[info.dtype])
        with torch.no_grad():
            param.copy_(torch.from_numpy(back.reshape(rows.shape)))
    return True


def verify_export(cfg: VerifyConfig, log=print) -> ExportReport:
    """An exported GGUF against the edited folder it was converted from: its logits in
    transformers and llama.cpp, each within its types' bound of the folder's model."""
    from .runtime import llama_cpp
    from .runtime.session import load_placed, load_tokenizer, start_stage

    start_stage(cfg.device)
    if cfg.report is not None:
        check_file_target(cfg.report, inputs_of(cfg), cfg.overwrite, "--report")
    folder, _ = resolve_model(cfg.source, cfg.revision)
    n_layers = Plan.load(folder).n_layers  # the edited folder the GGUF was exported from
    layout = read_layout(Path(cfg.edited))
    types: dict[str, int] = {}
    for t in layout.tensors:
        if len(t.shape) > 1:
            types[t.type_name] = types.get(t.type_name, 0) + 1
    prompts = read_prompts(cfg)[: cfg.max_prompts]
    e = max(epsilon(t) for t in types or {"F32": 0}) * math.sqrt(2 * n_layers)
    report = ExportReport(str(cfg.edited), types, e, len(prompts))
    log("running prompts through the edited checkpoint")
    inputs = encode_prompts(load_tokenizer(folder), prompts)
    model = load_placed(folder, cfg)
    ref = logits(model, inputs)
    report.max_abs_logit = max(float(t.abs().max()) for t in ref)
    log("running prompts with its weights rounded to the file's types (R)")
    checkpoint = GgufCheckpoint.open(layout, n_layers)
    if _round_to_types(model, checkpoint):
        report.rounding_max_logit_diff, report.rounding_mean_kl = compare(
            ref, logits(model, inputs)
        )
    del model
    log("running prompts through the GGUF in transformers")
    found = [("transformers", logits(load_placed(Path(cfg.edited), cfg), inputs))]
    if llama_cpp.available():
        log("running prompts through the GGUF in llama.cpp")
        found.append(("llama.cpp", llama_cpp.logits(Path(cfg.edited), inputs)))
    else:
        report.readers_skipped.append(f"llama.cpp: {llama_cpp.MISSING}")
    for reader, out in found:
        result = ReaderResult(reader, *compare(ref, out))
        logit_bound = max(
            2 * e * max(1.0, report.max_abs_logit), 2 * report.rounding_max_logit_diff
        )
        failures = _bound(result, logit_bound, max(4 * e * e, 4 * report.rounding_mean_kl))
        if reader == "transformers":
            report.failures += failures
        else:  # its own arithmetic has no measure without a source GGUF: reported, not judged
            result.max_logit_bound = result.mean_kl_bound = math.nan
        report.readers.append(result)
    if cfg.report is not None:
        write_file(cfg.report, json.dumps(report.to_dict(), indent=2) + "\n")
    return report
