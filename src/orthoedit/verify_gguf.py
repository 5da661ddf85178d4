"""``orthoedit verify SOURCE EDITED.gguf``: a GGUF checked against the model it came from, in
every reader installed (docs/design.md §4, "GGUF").

- GGUF to GGUF (SOURCE a ``.gguf``): the plan is read from the edited file's
  ``orthoedit.plan`` key; every unedited tensor and the source's metadata bytes must be there
  verbatim, and the logits of the edited file must equal run-time ablation of the dequantized
  source (its plan's hooks) to within the rounding of the edited tensors' types.
- An exported GGUF (SOURCE the edited safetensors folder it was converted from): its logits
  must equal that model's to within the rounding of the file's types.

Readers: transformers (dequantized, always) and llama.cpp (llama-cpp-python, where installed).
A reader computes in its own arithmetic (llama.cpp rounds activations to 8 bits for quantized
matrices), so each reader's bound adds C, what its logits differ by on the source itself.

Tolerance from the types: one element of a type rounds by at most ε = 2^-b relative to its
block's scale, b the whole bits per weight of the type (F16 2^-11, BF16 2^-8, Q8_0 2^-8, Q6_K
2^-6, Q4_K 2^-4, ...); as for FP8 (``verify.quant_tolerance``), logits within 2ε relative to
max(1, max |logit|) and mean KL within 4ε², for ε of the coarsest type the check depends on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import VerifyConfig
from .errors import BadInputError
from .model.gguf import GgufCheckpoint, GgufLayout, is_gguf, layout_config, read_layout
from .output import check_file_target, inputs_of, write_file

#: Whole bits of the element grid of the float types (their significand, with the hidden bit).
_FLOAT_BITS = {"F32": 24, "F16": 11, "BF16": 8, "F64": 53}


def epsilon(kind: str) -> float:
    """ε of a GGML type: 2^-b, b its significand bits (floats) or whole bits per weight."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if kind in _FLOAT_BITS:
        return 2.0 ** -_FLOAT_BITS[kind]
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return 2.0 ** -max(1, math.floor(size * 8 / block))


@dataclass
class ReaderResult:
    reader: str
    max_logit_diff: float
    mean_kl: float
    own_max_logit_diff: float = 0.0  # C: this reader on the source vs the reference's reader
    own_mean_kl: float = 0.0
    max_logit_bound: float = math.nan
    mean_kl_bound: float = math.nan


@dataclass
class GgufVerifyReport:
    edited: str
    mode: str  # "gguf-to-gguf" or "export"
    types: dict[str, int]  # type -> edited (or all) tensors of that type the check depends on
    epsilon: float
    prompts: int
    max_abs_logit: float = math.nan
    unedited_identical: bool = True
    metadata_identical: bool = True
    byte_mismatches: list[str] = field(default_factory=list)
    readers: list[ReaderResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # readers not run, with why
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def plan_of(layout: GgufLayout):
    """The plan an edited GGUF carries (``orthoedit.plan``)."""
    from .edit.plan import Plan

    raw = layout.get("orthoedit.plan")
    if not isinstance(raw, str):
        raise BadInputError(f"{layout.path} has no orthoedit.plan key: is it an orthoedit output?")
    try:
        return Plan.model_validate_json(raw)
    except ValueError as err:
        raise BadInputError(f"{layout.path}: orthoedit.plan is not a valid plan ({err}).") from err


def _same(a: GgufLayout, ta, b: GgufLayout, tb, block: int = 64 << 20) -> bool:
    if (ta.type, ta.shape, ta.nbytes) != (tb.type, tb.shape, tb.nbytes):
        return False
    with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
        import os

        for off in range(0, ta.nbytes, block):
            n = min(block, ta.nbytes - off)
            if os.pread(fa.fileno(), n, ta.start + off) != os.pread(fb.fileno(), n, tb.start + off):
                return False
    return True


def check_gguf_bytes(plan, source: GgufCheckpoint, edited: GgufCheckpoint, report) -> None:
    """Every tensor the plan does not edit, and every metadata byte, as in the source."""
    planned = {source.source[op.tensor][0].name for op in plan.ops}
    theirs = {t.name: t for t in edited.layout.tensors}
    for tensor in source.layout.tensors:
        if tensor.name in planned:
            continue
        twin = theirs.get(tensor.name)
        if twin is None or not _same(source.layout, tensor, edited.layout, twin):
            report.byte_mismatches.append(tensor.name)
    if plan.write_lm_head:
        embed = source.source[plan.tied_embedding][0]
        head = theirs.get("output.weight")
        if head is None or not _same(source.layout, embed, edited.layout, head):
            report.byte_mismatches.append("output.weight")
    report.unedited_identical = not report.byte_mismatches
    report.metadata_identical = edited.layout.kv_bytes.startswith(source.layout.kv_bytes)


def open_gguf(path: Path) -> GgufCheckpoint:
    layout = read_layout(path)
    return GgufCheckpoint.open(layout, int(layout_config(layout)["num_hidden_layers"]))


def verify_gguf(cfg: VerifyConfig, log=print) -> GgufVerifyReport:
    """Check ``cfg.edited`` (a GGUF) against ``cfg.source``; see the module docstring."""
    from .model.gguf import resolve_gguf
    from .runtime.hooks import plan_hooks
    from .runtime.session import load_placed, load_tokenizer, start_stage
    from .verify import _compare, _logits, _read_prompts, encode_prompts

    start_stage(cfg.device)
    if cfg.report is not None:
        check_file_target(cfg.report, inputs_of(cfg), cfg.overwrite, "--report")
    edited = open_gguf(Path(cfg.edited))
    prompts = _read_prompts(cfg)[: cfg.max_prompts]
    if is_gguf(cfg.source):
        source_path = resolve_gguf(cfg.source, cfg.revision)
        source = open_gguf(source_path)
        plan = plan_of(edited.layout)
        planned = {edited.source[op.tensor][0].name for op in plan.ops}
        types = _types([t for t in edited.layout.tensors if t.name in planned])
        report = GgufVerifyReport(str(cfg.edited), "gguf-to-gguf", types, 0.0, len(prompts))
        log("checking bytes of unedited tensors and of the metadata")
        check_gguf_bytes(plan, source, edited, report)
        log("running prompts through the dequantized source with the plan's hooks")
        inputs = encode_prompts(load_tokenizer(source_path), prompts)
        model = load_placed(source_path, cfg)
        base = _logits(model, inputs)
        with plan_hooks(model, plan, source):
            ref = _logits(model, inputs)
        del model
        source_file = source_path
    else:
        types = _types(edited.layout.tensors)
        report = GgufVerifyReport(str(cfg.edited), "export", types, 0.0, len(prompts))
        log("running prompts through the edited safetensors model")
        folder = Path(cfg.source)
        inputs = encode_prompts(load_tokenizer(folder), prompts)
        ref = base = _logits(load_placed(folder, cfg), inputs)
        source_file = None
    report.epsilon = max(epsilon(t) for t in types)
    report.max_abs_logit = max(float(t.abs().max()) for t in ref)
    log("running prompts through the edited GGUF in transformers")
    out = _logits(load_placed(Path(cfg.edited), cfg), inputs)
    report.readers.append(ReaderResult("transformers", *_compare(ref, out)))
    _llama_cpp(report, cfg, inputs, ref, base, source_file, log, _compare)
    _judge(report)
    if cfg.report is not None:
        write_file(cfg.report, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _types(tensors) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) > 1:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts or {"F32": 0}


def _llama_cpp(report, cfg, inputs, ref, base, source_file, log, compare) -> None:
    """The edited file in llama.cpp, and its own difference C on the source (or, for an
    export, none: the reference is the safetensors model itself, so C is the reader's
    difference there, measured by the bound's 2ε)."""
    from .runtime import llama_cpp

    if not llama_cpp.available():
        report.skipped.append(f"llama.cpp: {llama_cpp.MISSING}")
        return
    log("running prompts through the edited GGUF in llama.cpp")
    out = llama_cpp.logits(Path(cfg.edited), inputs)
    result = ReaderResult("llama.cpp", *compare(ref, out))
    if source_file is not None:
        log("running prompts through the source GGUF in llama.cpp (its own arithmetic)")
        own = llama_cpp.logits(source_file, inputs)
        result.own_max_logit_diff, result.own_mean_kl = compare(base, own)
    report.readers.append(result)


def _judge(report: GgufVerifyReport) -> None:
    e = report.epsilon
    scale = max(1.0, report.max_abs_logit)
    for r in report.readers:
        r.max_logit_bound = 2 * e * scale + 2 * r.own_max_logit_diff
        r.mean_kl_bound = 4 * e * e + 4 * r.own_mean_kl
        if r.max_logit_diff > r.max_logit_bound:
            report.failures.append(
                f"{r.reader}: max |Δlogit| {r.max_logit_diff:.3g} > {r.max_logit_bound:.3g}"
            )
        if r.mean_kl > r.mean_kl_bound:
            report.failures.append(f"{r.reader}: mean KL {r.mean_kl:.3g} > {r.mean_kl_bound:.3g}")
    if not report.unedited_identical:
        report.failures.append(f"unedited tensors differ: {', '.join(report.byte_mismatches[:5])}")
    if not report.metadata_identical:
        report.failures.append("the source's metadata is not copied verbatim")
