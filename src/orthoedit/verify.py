"""``orthoedit verify``: the edited checkpoint against the plan applied at run time
(docs/design.md §6).

A number beats a look: max |Δlogit| and KL against plan hooks, ``‖uᵀW‖/‖W‖`` for every edited
tensor (``‖U W‖/‖W‖`` over the whole span for several directions), the largest ``|r̂ᵀx|/‖x‖``
in the residual stream, and byte identity of everything the plan did not touch. Tolerances
depend on the storage dtype; above them verify exits 1. The edit of a GGUF (a GGUF) is checked
against its source GGUF alike (``edit.gguf_check`` reads it), where its edited tensors are
stored as floats.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, astuple, dataclass, field, replace

import numpy as np
import torch

from .config import VerifyConfig
from .edit.gguf_check import check_gguf_bytes, storage_type
from .edit.ortho import norm_factors
from .edit.plan import Plan, op_basis
from .errors import BadInputError
from .model.checkpoint import Checkpoint, TensorInfo, same_bytes
from .model.derive import table_or_derived
from .model.gguf import GgufCheckpoint
from .model.quant import QuantFormat
from .model.source import open_checkpoint
from .output import check_file_target, inputs_of, write_file
from .runtime.batching import input_device
from .runtime.hooks import ablation_hooks, contribution_hooks, input_hooks, plan_hooks
from .verify_gguf import llama_cpp_check, type_format, verify_inputs
from .verify_logits import compare as _compare
from .verify_logits import encode_prompts
from .verify_logits import logits as _logits
from .verify_logits import read_prompts as _read_prompts


@dataclass(frozen=True)
class Tolerance:
    max_logit_diff: float  # relative to max(1, max |logit|)
    mean_kl: float
    weight_residual: float  # ‖uᵀW' − (1−s)uᵀW‖ / ‖W‖
    residual_leak: float  # |r̂ᵀx| / ‖x‖
    norm_change: float  # norm-preserving: max |‖w'‖ − ‖w‖| / ‖w‖ over written vectors
    rounding_multiple: float = 0.0  # quantized: ‖U E‖ / (its bound from the format); 0: unused
    float_weight_residual: float = 0.0  # quantized: weight_residual of planned float tensors


# fp32 is exact up to float rounding; half precision re-rounds every edited weight, which
# re-introduces a small component along r: checked relative to the weights' own size.
TOLERANCES = {
    "F32": Tolerance(1e-4, 1e-7, 1e-6, 1e-4, 1e-5),
    "F16": Tolerance(2e-2, 2e-4, 5e-4, 5e-3, 2e-3),
    "BF16": Tolerance(5e-2, 2e-3, 4e-3, 1e-2, 1e-2),
}
#: Quantized formats (model.quant): one requantization of each edited weight, whose elements
#: each round by at most ε relative (FP8 e4m3, 3 mantissa bits: ε = 2⁻⁴; MXFP4 e2m1, 1 bit:
#: ε = 2⁻²). See ``quant_tolerance``.
ROUNDING_MULTIPLE = 2.0
#: Quantized formats: the logits may differ from the reference by this multiple of R, the
#: measured effect of one fresh rounding of the planned weights (``rounding_reference``), and
#: the mean KL by its square. The edit's error E is a rounding of the same tensors at the same
#: relative precision, one draw against R's largest of three: E/R was 0.18-1.27 (KL ratio
#: 0.16-1.28) over 30 tiny FP8 instances (docs/design.md), so 2 leaves room for the draw while
#: a wrong direction's edit still fails.
MEASURED_MULTIPLE = 2.0
#: ``--dtype`` -> the storage dtype whose tolerances its arithmetic needs.
#: float64 arithmetic leaves the storage dtype's rounding alone: fp32's tolerances, for models
#: whose float32 kernels (the torch fallbacks of Gated DeltaNet, say) are noisier than them.
COMPUTE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F32"}


def quant_tolerance(fmt: QuantFormat) -> Tolerance:
    """Tolerances of a quantized format, from its unit roundoff ε (docs/design.md, "Quantized
    checkpoints"). The reference runs the dequantized source, whose writers carry the source's
    own rounding (at most ε of each weight, relative); the edited checkpoint carries one fresh
    requantization (again at most ε): between them 2ε, so logits within 2ε relative and KL
    within (2ε)² (second order in the logit change). Per weight, not per logit: these are the
    floors under the measured bounds (``logit_bounds``, ``rounding_effect``). The
    weight check is judged against the format's own rounding: ‖U E‖ for the requantization error
    E is at most ``ROUNDING_MULTIPLE`` × sqrt(Σ U² δ²), δ the largest rounding error of each
    element (its root mean square is δ/√3); ‖U W'‖/‖W‖ itself is reported, bounded by ε."""
    e = fmt.epsilon
    return Tolerance(2 * e, 4 * e * e, e, 4 * e, 4 * e, ROUNDING_MULTIPLE)


def tolerance_for(
    storage: str, compute: str, quant: QuantFormat | None = None, floats: str | None = None
) -> Tolerance:
    """The looser of the storage dtype's (or quantized format's) tolerances and those of the
    dtype the models run in: a float32 checkpoint checked in bfloat16 is only as exact as
    bfloat16 arithmetic. ``floats``: the dtype of a quantized checkpoint's planned tensors
    stored in float (gpt-oss's BF16 embedding and attention), whose weights are judged by it,
    not by the format's ε (2⁻² for MXFP4 would pass an unedited writer)."""
    a = quant_tolerance(quant) if quant else TOLERANCES[storage]
    if quant and floats:
        a = replace(a, float_weight_residual=tolerance_for(floats, compute).weight_residual)
    b = TOLERANCES[COMPUTE[compute]]
    return Tolerance(*(max(x, y) for x, y in zip(astuple(a), astuple(b), strict=True)))


@dataclass
class VerifyReport:
    edited: str
    storage_dtype: str
    tolerance: dict
    prompts: int
    method: str = "project"
    compute_dtype: str = "float32"  # what the models ran in (--dtype)
    max_logit_diff: float = math.nan
    max_abs_logit: float = math.nan
    mean_kl: float = math.nan
    max_weight_residual: float = 0.0
    worst_tensor: str | None = None
    residual_leak: float = math.nan
    leak_checked: bool = False
    headers_identical: bool = True
    unedited_identical: bool = True
    byte_mismatches: list[str] = field(default_factory=list)
    max_norm_change: float | None = None  # norm-preserving only
    max_rounding_ratio: float | None = None  # quantized: ‖U E‖ / its bound, worst matrix
    rounding_worst_tensor: str | None = None  # the tensor of that matrix
    max_float_weight_residual: float | None = None  # quantized: planned tensors stored in float
    float_worst_tensor: str | None = None
    rounding_max_logit_diff: float | None = None  # quantized: R, one fresh rounding's effect
    rounding_mean_kl: float | None = None  # quantized: its mean KL
    max_logit_bound: float = math.nan  # what max |Δlogit| was judged against
    mean_kl_bound: float = math.nan  # and the mean KL
    paper_ablation_max_logit_diff: float | None = None
    paper_ablation_kl: float | None = None
    contribution_kl: float | None = None
    readers: list[dict] = field(default_factory=list)  # a GGUF: llama.cpp's (verify_gguf)
    readers_skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return same_bytes(a.file, a.start, b.file, b.start, a.nbytes)


def check_bytes(plan: Plan, source: Checkpoint, edited: Checkpoint, report: VerifyReport) -> None:
    """Unedited tensors byte-identical; shard headers identical; untied head = source embedding."""
    by_name = {f.path.name: f for f in edited.files}
    for shard in source.files:
        twin = by_name.get(shard.path.name)
        if twin is None and len(source.files) == 1 and len(edited.files) > 1:
            twin = edited.files[0]  # a single file renamed to a shard by untie
        if twin is None or twin.header_bytes != shard.header_bytes:
            report.headers_identical = False
    rewritten = plan.edited | {op.scales for op in plan.ops if op.scales}  # fresh scales too
    for name, info in source.tensors.items():
        if name in rewritten:
            continue
        other = edited.tensors.get(name)
        if other is None or not _same_bytes(info, other):
            report.byte_mismatches.append(name)
    if plan.write_lm_head:
        head = edited.tensors.get(plan.unembed_tensor)
        if head is None or not _same_bytes(source.tensors[plan.tied_embedding], head):
            report.byte_mismatches.append(plan.unembed_tensor)
    report.unedited_identical = not report.byte_mismatches


def check_weights(plan: Plan, source: Checkpoint, edited: Checkpoint, report: VerifyReport) -> None:
    """‖U W' − (1−s) U W‖ / ‖W‖ for every edited tensor, over its whole basis U (‖uᵀW'‖/‖W‖
    for a full projection against one direction). In a quantized plan the tensors stored in
    float are reported apart (``max_float_weight_residual``), and each quantized matrix (each
    expert of a fused tensor: one unedited expert must show) against its rounding bound."""
    preserve = plan.method == "norm-preserving"
    split = any(op.scales for op in plan.ops)
    for op in plan.ops:
        basis = op_basis(op, plan, source)
        before, sq, _ = _along(source, op, basis)
        after, sq_after, bounds = _along(edited, op, basis)
        expect = (1.0 - op.scale) * before
        if preserve:  # each vector was scaled back to its length after the projection
            expect = expect * norm_factors(sq, (before * before).sum(0), op.scale)
            change = np.abs(np.sqrt(sq_after) - np.sqrt(sq)) / np.maximum(np.sqrt(sq), 1e-30)
            worst = float(change.max()) if change.size else 0.0
            report.max_norm_change = max(report.max_norm_change or 0.0, worst)
        norm = float(sq.sum()) ** 0.5
        error = after - expect
        value = float(np.linalg.norm(error)) / max(norm, 1e-30)
        if bounds is not None:  # the matrices' vectors one after the other
            parts = np.split(error, len(bounds), axis=-1)
            ratio = max(
                np.linalg.norm(e) / max(b**0.5, 1e-30) for e, b in zip(parts, bounds, strict=True)
            )
            if float(ratio) > (report.max_rounding_ratio or 0.0):
                report.max_rounding_ratio, report.rounding_worst_tensor = float(ratio), op.tensor
        if split and op.scales is None:
            if value > (report.max_float_weight_residual or 0.0) or not report.float_worst_tensor:
                report.max_float_weight_residual, report.float_worst_tensor = value, op.tensor
        elif value > report.max_weight_residual or report.worst_tensor is None:
            report.max_weight_residual, report.worst_tensor = value, op.tensor


def _along(checkpoint: Checkpoint, op, basis: np.ndarray):
    """(components in the basis, squared lengths, bound on the squared rounding component or
    None for a float tensor) of an op's tensor, dequantized if it is quantized."""
    if op.scales is None:
        return (*checkpoint.along_and_lengths(op.tensor, basis, op.axis), None)
    from .edit.requant import quantized_along

    def pair(name: str):
        info = checkpoint.tensors[name]
        return checkpoint.shard(info), info

    return quantized_along(checkpoint.quant, pair(op.tensor), pair(op.scales), basis, op.axis)


@torch.no_grad()
def _leak(model, table, inputs: list[torch.Tensor], basis: np.ndarray, n_layers: int) -> float:
    """Largest ``‖U x‖ / ‖x‖`` over every residual state x entering a block or the final norm
    (``|r̂ᵀx|/‖x‖`` for one direction)."""
    q = torch.from_numpy(basis)  # [k, d]
    worst = [0.0]

    def seen(x: torch.Tensor) -> torch.Tensor:
        x = x.to("cpu", torch.float64).reshape(-1, x.shape[-1])
        along = (x @ q.T).norm(dim=-1)
        worst[0] = max(worst[0], float((along / x.norm(dim=-1).clamp_min(1e-30)).max()))
        return None

    paths = [table.blocks.module.format(layer=i) for i in range(n_layers)]
    with input_hooks(model, [*paths, table.blocks.final_norm], seen):
        for ids in inputs:
            model(input_ids=ids.to(input_device(model)))
    return worst[0]


def storage_dtype(plan: Plan, edited: Checkpoint | GgufCheckpoint) -> str:
    if isinstance(edited, GgufCheckpoint):
        return storage_type(plan, edited)
    if edited.quant is not None and any(op.scales for op in plan.ops):
        return edited.quant.method.upper()
    return float_dtype(plan, edited) or "F32"


def float_dtype(plan: Plan, edited: Checkpoint) -> str | None:
    """The loosest storage dtype of the planned tensors stored in float; None if none is."""
    dtypes = {edited.tensors[op.tensor].dtype for op in plan.ops if not op.scales}
    if not dtypes:
        return None
    return "BF16" if "BF16" in dtypes else "F16" if "F16" in dtypes else "F32"


def verify(cfg: VerifyConfig, log=print) -> VerifyReport:
    from .runtime.session import load_placed, load_tokenizer, start_stage

    start_stage(cfg.device)  # verify reports its own steps
    if cfg.report is not None:
        check_file_target(cfg.report, inputs_of(cfg), cfg.overwrite, "--report")
    plan, folder, config, quant = verify_inputs(cfg)
    source, edited = open_checkpoint(folder, quant), open_checkpoint(cfg.edited, quant)
    table = table_or_derived(config)
    _check_plan(cfg, plan, table)
    dtype = storage_dtype(plan, edited)
    quantized = dtype not in TOLERANCES
    fmt = (quant or type_format(dtype)) if quantized else None  # a GGUF's type: no quant
    tol = tolerance_for(dtype, cfg.dtype, fmt, float_dtype(plan, edited))
    prompts = _read_prompts(cfg)[: cfg.max_prompts]
    report = VerifyReport(str(cfg.edited), dtype, asdict(tol), len(prompts), plan.method, cfg.dtype)

    log("checking bytes of unedited tensors")
    check = check_gguf_bytes if isinstance(source, GgufCheckpoint) else check_bytes
    check(plan, source, edited, report)
    log("checking edited tensors against the direction")
    check_weights(plan, source, edited, report)

    log("running prompts through the source model with the plan's hooks")
    inputs = encode_prompts(load_tokenizer(folder), prompts)
    residual_checked = plan.full and plan.shared  # per-layer rows: no one span to remove
    base, ref, paper, contrib, rounding = _references(
        cfg, folder, plan, table, source, inputs, residual_checked, log
    )

    log("running prompts through the edited checkpoint")
    new_model = load_placed(cfg.edited, cfg)
    out = _logits(new_model, inputs)
    report.max_logit_diff, report.mean_kl = _compare(ref, out)
    report.max_abs_logit = max(float(t.abs().max()) for t in ref)
    if paper is not None:
        report.paper_ablation_max_logit_diff, report.paper_ablation_kl = _compare(paper, out)
    if contrib is not None:
        report.contribution_kl = _compare(contrib, out)[1]
    if rounding is not None:
        report.rounding_max_logit_diff, report.rounding_mean_kl = rounding
    report.residual_leak = _leak(new_model, table, inputs, plan.basis(None), plan.n_layers)
    report.leak_checked = residual_checked
    _check_bounds(report, tol, exact=plan.exact)
    if base is not None:  # a GGUF: in llama.cpp too, where it is installed
        llama_cpp_check(cfg, folder, inputs, base, ref, report, log)
    if cfg.report is not None:
        write_file(cfg.report, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _check_plan(cfg: VerifyConfig, plan: Plan, table) -> None:
    """The plan is for this model's family, and its directions have the model's width."""
    if table.family != plan.family:
        raise BadInputError(
            f"{cfg.source} is a {table.family} model; the plan is for {plan.family}."
        )
    sizes = {len(v) for v in plan.directions} | {
        len(row) for stack in plan.per_layer_directions for row in stack
    }
    if sizes != {int(plan.d_model)}:
        raise BadInputError(f"{cfg.edited}/plan.json is inconsistent (direction size).")


def _references(cfg, folder, plan: Plan, table, source, inputs, residual_checked: bool, log):
    """The source model's logits (placed as ``cfg`` says): of a GGUF without hooks (llama.cpp's
    check), and with the plan's hooks; with residual
    ablation of the direction (pre-norm, one span), with each writer's contribution projected
    (post-norm), and with the hooks and the planned quantized weights rounded once more
    (``rounding_reference``); None where not computed."""
    from .runtime.session import load_placed

    model = load_placed(folder, cfg)
    base = _logits(model, inputs) if isinstance(source, GgufCheckpoint) else None
    with plan_hooks(model, plan, source):
        ref = _logits(model, inputs)
        rounding = rounding_effect(model, plan, source, inputs, ref, log)
    paper = contrib = None
    if residual_checked and not table.post_norm:
        with ablation_hooks(model, table, plan.vectors(None), plan.n_layers):
            paper = _logits(model, inputs)
    if table.post_norm:
        with contribution_hooks(model, plan, source):
            contrib = _logits(model, inputs)
    return base, ref, paper, contrib, rounding


def rounding_effect(model, plan: Plan, source: Checkpoint, inputs, ref, log=print):
    """R: (max |Δlogit|, mean KL) from ``ref`` (the plan's hooks, on) when every planned
    quantized weight is rounded once more in its own format on a shifted grid
    (``model.quant.regrid``, in place, put back after), the largest over the grids of
    ``REGRID_FACTORS``: the format's own rounding of these weights as this model's logits see
    it. One draw scatters (a mixture of experts' routing flips with it), so the largest of
    three. None for a float plan, or when a planned weight is not in memory as loaded
    (offloaded, say): then the format's ε alone is the tolerance."""
    from .model.quant import REGRID_FACTORS
    from .runtime.rounding import rounded_again

    if isinstance(source, GgufCheckpoint):
        return _gguf_rounding(model, plan, source, inputs, ref, log)
    if source.quant is None or not any(op.scales for op in plan.ops):
        return None
    log("running prompts with the planned weights rounded once more (the format's rounding)")
    worst = (0.0, 0.0)
    for factor in REGRID_FACTORS:
        with rounded_again(model, plan, source, factor) as missing:
            if missing:
                log(f"not measured: {missing[0]} is not in memory; judged by the format's ε")
                return None
            diff, kl = _compare(ref, _logits(model, inputs))
        worst = (max(worst[0], diff), max(worst[1], kl))
    return worst


def _gguf_rounding(model, plan: Plan, source, inputs, ref, log):
    """R of a GGUF's edit: the planned weights replaced by the nearest rounding of their
    exact projection in the type the edit writes (``runtime.rounding.requantized_plainly``),
    with the hooks on; None for an edit stored in float types."""
    from .runtime.rounding import requantized_plainly

    with requantized_plainly(model, plan, source) as (changed, missing):
        if not changed:
            return None
        if missing:
            log(f"not measured: {missing[0]} is not in memory; judged by the types' ε")
            return None
        log("running prompts with the planned weights rounded plainly (the types' rounding)")
        return _compare(ref, _logits(model, inputs))


def logit_bounds(report: VerifyReport, tol: Tolerance) -> tuple[float, float]:
    """(max |Δlogit|, mean KL) the edited checkpoint may differ from the reference by: the
    tolerance's, relative to max(1, max |logit|); for a quantized checkpoint with R measured,
    ``MEASURED_MULTIPLE`` × R (its square × R's KL) where that is larger."""
    logit = tol.max_logit_diff * max(1.0, report.max_abs_logit)
    kl = tol.mean_kl
    if report.rounding_max_logit_diff is not None:
        logit = max(logit, MEASURED_MULTIPLE * report.rounding_max_logit_diff)
        kl = max(kl, MEASURED_MULTIPLE**2 * (report.rounding_mean_kl or 0.0))
    return logit, kl


def _check_bounds(report: VerifyReport, tol: Tolerance, exact: bool = True) -> None:
    """Failures. A non-exact method (norm-preserving) is not equal to run-time ablation by
    design: its logits and KL against the hooks are reported, not judged; its weights still
    are (no component along u left, every vector's length kept)."""
    logit_bound, kl_bound = logit_bounds(report, tol)
    checks = []
    if exact:
        report.max_logit_bound, report.mean_kl_bound = logit_bound, kl_bound
        checks += [
            (
                report.max_logit_diff <= logit_bound,
                f"max |Δlogit| {report.max_logit_diff:.3g} > {logit_bound:.3g}",
            ),
            (report.mean_kl <= kl_bound, f"mean KL {report.mean_kl:.3g} > {kl_bound:.3g}"),
        ]
    checks += _weight_checks(report, tol)
    checks += [
        (
            not report.leak_checked or report.residual_leak <= tol.residual_leak,
            f"residual leak {report.residual_leak:.3g} > {tol.residual_leak:.3g}",
        ),
        (
            report.unedited_identical,
            f"unedited tensors differ: {', '.join(report.byte_mismatches[:5])}",
        ),
        (report.headers_identical, "a shard header differs from the source"),
    ]
    if exact and report.paper_ablation_max_logit_diff is not None:
        checks.append(
            (
                report.paper_ablation_max_logit_diff <= logit_bound,
                f"differs from residual-stream ablation: max |Δlogit| "
                f"{report.paper_ablation_max_logit_diff:.3g}",
            )
        )
    report.failures = [msg for ok, msg in checks if not ok]


def _weight_checks(report: VerifyReport, tol: Tolerance) -> list[tuple[bool, str]]:
    """(passed, failure message) of the checks on the edited tensors' weights."""
    checks = []
    if report.max_norm_change is not None:
        checks.append(
            (
                report.max_norm_change <= tol.norm_change,
                f"vector lengths changed by up to {report.max_norm_change:.3g} "
                f"> {tol.norm_change:.3g}",
            )
        )
    if report.max_rounding_ratio is not None:
        checks.append(
            (
                report.max_rounding_ratio <= tol.rounding_multiple,
                f"‖U(W' − PW)‖ is {report.max_rounding_ratio:.3g}× the format's rounding bound "
                f"> {tol.rounding_multiple:.3g} ({report.rounding_worst_tensor})",
            )
        )
    checks.append(
        (
            report.max_weight_residual <= tol.weight_residual,
            f"‖uᵀW‖/‖W‖ {report.max_weight_residual:.3g} > {tol.weight_residual:.3g} "
            f"({report.worst_tensor})",
        )
    )
    if report.max_float_weight_residual is not None:
        checks.append(
            (
                report.max_float_weight_residual <= tol.float_weight_residual,
                f"‖uᵀW‖/‖W‖ {report.max_float_weight_residual:.3g} > "
                f"{tol.float_weight_residual:.3g} ({report.float_worst_tensor}, stored in float)",
            )
        )
    return checks
