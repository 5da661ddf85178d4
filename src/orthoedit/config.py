"""Typed options: one pydantic model per stage is the recipe schema, the CLI help and the card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .export.llama_cpp import CONVERTED, ENV, LLAMA_CPP_PYTHON, QUANTIZED, canonical_type
from .model.architectures import Site, TiedPolicy

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device(value: str | None) -> str | None:
    """A device torch can name, or a device_map strategy. (Whether this machine has it is
    checked where the model loads: a recipe may be validated on another machine.)"""
    if value is None or value in DEVICE_MAPS:
        return value
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {value!r} is not a device (e.g. cpu, cuda:1, auto)") from None
    return value


Device = Annotated[str | None, AfterValidator(_device)]
#: The dtypes a model runs in; the methods of an edit and of an upload; lm-eval's backends.
DType = Literal["auto", "float32", "bfloat16", "float16"]
EditMethod = Literal["project", "norm-preserving", "biprojected"]
PushMethod = Literal["auto", "commit", "large"]
Backend = Literal["hf", "vllm", "llama.cpp"]
#: A prompt source (orthoedit.prompts.load_prompts): a name, a file or a dataset; a Path is
#: taken as its string.
PromptSource = Annotated[
    str | None, BeforeValidator(lambda v: str(v) if isinstance(v, Path) else v)
]


# Options that several stages declare alike: one type each, with its help.
ModelId = Annotated[
    str,
    Field(
        description="Local checkpoint folder, Hugging Face Hub model id, or GGUF file (a local "
        ".gguf, or OWNER/REPO/FILE.gguf on the Hub; loaded dequantized)."
    ),
]
Revision = Annotated[str | None, Field(description="Hub revision (branch, tag, commit).")]
Template = Annotated[
    Path | None, Field(description="Jinja chat template to use instead of the tokenizer's.")
]
Column = Annotated[
    str, Field(description="Prompt field of .jsonl/.json/.csv rows and dataset rows.")
]
Split = Annotated[str, Field(description="Dataset split to draw prompts from.")]
PromptSeed = Annotated[int, Field(description="Seed for drawing the prompts.")]
DirectionLayer = Annotated[
    int | None, Field(description="Row to use from a per-layer [n_layers, d_model] direction.")
]
OverwriteFolder = Annotated[bool, Field(description="Replace an existing output folder.")]
OverwriteReport = Annotated[bool, Field(description="Replace an existing --report file.")]


class _Placed(BaseModel):
    """Where and in what a command's models run: every stage that runs a model has these,
    and passes them to the one loader (``runtime.session.load_placed``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    dtype: DType = Field(
        default="auto",
        description="Dtype to run the models in. auto: the checkpoint's on a GPU; on a CPU the "
        "faster of the checkpoint's and float32 on this machine (timed once, logged and "
        "recorded).",
    )
    device: Device = Field(
        default=None, description='Device or device_map, e.g. "cuda", "auto" (default: CPU).'
    )
    max_memory: str | None = Field(
        default=None,
        description='With --device auto: memory per device, e.g. "0=70GiB,cpu=120GiB" '
        "(accelerate's max_memory); what does not fit is offloaded to --offload-folder.",
    )
    offload_folder: Path | None = Field(
        default=None,
        description="With --device auto: folder for the weights that fit on no device (disk "
        "offload; slow, but a model larger than GPU + CPU memory can run).",
    )

    @model_validator(mode="after")
    def _spread_options_need_a_map(self):
        if (self.max_memory or self.offload_folder) and self.device not in DEVICE_MAPS:
            raise ValueError(
                "--max-memory and --offload-folder need --device auto (or another device_map "
                f"strategy: {', '.join(DEVICE_MAPS)})"
            )
        return self


class _Running(_Placed):
    """Options every command that runs chat models shares."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    system: str | None = Field(default=None, description="System prompt for every conversation.")
    batch_size: int = Field(default=32, ge=1, description="Prompts per batch.")


class _Generated(BaseModel):
    """How a command generates: transformers (``hf``, placed by the placement options) or
    vLLM (``runtime.vllm_engine``; where vLLM is not installed the command says so and uses
    transformers)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    backend: Backend = Field(
        default="hf",
        description="Generation backend: hf (transformers), vllm for GPUs, or llama.cpp for "
        "GGUF models (each falls back to hf, saying so, where it is not installed).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vllm: GPUs per model replica (tensor parallel)."
    )
    data_parallel_size: int = Field(
        default=1,
        ge=1,
        description="vllm: model replicas, each answering its share of the prompts (data "
        "parallel; more than 1 needs ray).",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vllm: share of each GPU's memory to use."
    )
    #: Whether the placement options place the same models the backend runs (not so in
    #: search, where they place the trials' model and the backend is the confirmation's).
    _placement_is_generation: ClassVar[bool] = True

    @model_validator(mode="after")
    def _parallel_is_vllm(self):
        if self.backend != "vllm" and max(self.tensor_parallel_size, self.data_parallel_size) > 1:
            raise ValueError(
                "--tensor-parallel-size and --data-parallel-size are vLLM's: add --backend vllm "
                "(with transformers, --device auto spreads a model over the GPUs)"
            )
        if (
            self._placement_is_generation
            and self.backend == "vllm"
            and (getattr(self, "max_memory", None) or getattr(self, "offload_folder", None))
        ):
            raise ValueError(
                "--max-memory and --offload-folder place a transformers model; vLLM places its "
                "own (--tensor-parallel-size, --gpu-memory-utilization)"
            )
        return self


class ApplyConfig(BaseModel):
    """Options of ``orthoedit apply``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model: ModelId
    direction: list[Path] = Field(
        min_length=1,
        description="Direction file: .safetensors (tensor 'direction'), .pt or .npy; "
        "[d_model], a [k, d_model] span (kind 'span') or [n_layers, d_model]. Give it more "
        "than once to project out the span of all of them (orthonormalized in order).",
    )
    out: Path | None = Field(
        default=None,
        description="Output folder for the edited checkpoint; for a GGUF MODEL, the edited "
        ".gguf file (not with --dry-run).",
    )
    direction_layer: DirectionLayer = None
    per_layer: bool = Field(
        default=False,
        description="Use every row of a per-layer [n_layers, d_model] direction: block i's "
        "writers are projected against row i, the embedding against row 0.",
    )
    revision: Revision = None
    base_model: str | None = Field(
        default=None, description="Hub id recorded as base_model in the card (local MODEL)."
    )
    sites: list[Site] = Field(
        default=["embed", "attn", "mlp"],
        min_length=1,
        description="Residual writers to edit: embed, attn, mlp (default: all three).",
    )
    layers: str | None = Field(
        default=None, description="Decoder blocks to edit, START:END half-open (default: all)."
    )
    scales: Path | None = Field(
        default=None,
        description='JSON of scales per site and layer, e.g. {"attn": [1, 0.5], "embed": 1}; '
        "1.0 = full projection, 0 = untouched.",
    )
    tied: TiedPolicy | None = Field(
        default=None,
        description="Tied embeddings: untie, skip or edit (default: the architecture's policy).",
    )
    method: EditMethod = Field(
        default="project",
        description="project: exact ablation; norm-preserving: project, then give each "
        "written vector its length back (not exact; verify compares it by KL); biprojected: "
        "the direction made orthogonal to the harmless mean first, then projected exactly.",
    )
    harmless_mean: Path | None = Field(
        default=None,
        description="For biprojected: the harmless mean [d_model] (default: measure's "
        "candidates.safetensors beside the direction, at its layer and position).",
    )
    overwrite: OverwriteFolder = False
    dry_run: bool = Field(default=False, description="Print the plan and write nothing.")

    @field_validator("direction", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _out_unless_dry_run(self):
        if self.out is None and not self.dry_run:
            raise ValueError("--out is required (or use --dry-run)")
        return self


class ArchitecturesConfig(BaseModel):
    """Options of ``orthoedit architectures``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model: str | None = Field(
        default=None,
        description="Check this model's config.json (a folder or Hub id; only config.json is "
        "fetched, no weights), or a GGUF's metadata. Without it, list every family.",
    )
    revision: Revision = None


class VerifyConfig(_Placed):
    """Options of ``orthoedit verify``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    source: str = Field(
        description="The source model (folder, Hub id or GGUF) the edit was made from."
    )
    edited: Path = Field(
        description="The edited checkpoint folder (or GGUF) written by apply, or a GGUF "
        "exported from the edited folder given as SOURCE."
    )
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field(
        default="float32",
        description="Dtype to run the models in. float64 checks a float32 checkpoint beyond the "
        "noise of float32 kernels (the torch fallbacks of linear-attention mixers).",
    )
    revision: str | None = Field(default=None, description="Hub revision of the source.")
    prompts: PromptSource = Field(
        default=None,
        description="Prompts: a file or dataset, 'bundled' or 'organism' (their harmful and "
        "harmless test prompts; default: a built-in set of everyday prompts).",
    )
    column: Column = "prompt"
    split: Split = "train"
    max_prompts: int = Field(default=8, ge=1, description="How many prompts to run.")
    report: Path | None = Field(default=None, description="Also write the report as JSON here.")
    overwrite: OverwriteReport = False


class MeasureConfig(_Running):
    """Options of ``orthoedit measure``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model: ModelId
    out: Path = Field(description="Output folder for the direction and the candidates.")
    harmful: PromptSource = Field(
        default=None,
        description="Harmful prompts: 'bundled' (the bundled pool's train and val splits, "
        "default), 'organism', a .jsonl, .json, .csv or .txt file, or a dataset (Hub id or local "
        "dataset folder).",
    )
    harmless: PromptSource = Field(
        default=None,
        description="Harmless prompts: 'bundled' (default), 'organism', a file or a dataset, "
        "as --harmful.",
    )
    column: Column = "prompt"
    split: Split = "train"
    n_train: int = Field(default=128, ge=2, description="Prompts per set for the means.")
    n_val: int = Field(
        default=32, ge=2, description="Further prompts per set for scoring the candidates."
    )
    seed: PromptSeed = 0
    filter: bool = Field(
        default=True,
        description="Keep only harmful prompts the model refuses and harmless ones it answers "
        "(short greedy generations).",
    )
    layer: int | None = Field(
        default=None, description="Take the candidate at this layer (input of block LAYER)."
    )
    position: int | None = Field(
        default=None,
        description="Take the candidate at this post-instruction position (-1 = last token).",
    )
    max_kl: float = Field(
        default=0.1, ge=0, description="Largest first-token KL on harmless prompts to accept."
    )
    max_layer_frac: float = Field(
        default=0.8, gt=0, le=1, description="Only candidates below this fraction of depth."
    )
    top_k: int = Field(
        default=20,
        ge=0,
        description="Fully score only the best K candidates by a quick bypass on 8 prompts "
        "(0 = score all).",
    )
    thorough: bool = Field(
        default=False, description="Score every candidate fully (the paper's protocol; GPU)."
    )
    refusal_tokens: str | None = Field(
        default=None,
        description="Comma-separated refusal tokens, e.g. 'I,Sorry' (default: derived from "
        "the model's own refusals).",
    )
    template: Template = None
    revision: Revision = None
    overwrite: OverwriteFolder = False


class EvalBenchConfig(_Generated):
    """Options of ``orthoedit eval bench``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    base: str = Field(
        description="The base model: local folder, Hugging Face Hub model id or GGUF."
    )
    edited: str = Field(description="The edited model: local folder, Hub model id or GGUF.")
    out: Path = Field(description="Output folder for the report and lm-eval's raw results.")
    tasks: list[str] | None = Field(
        default=None,
        description="lm-eval tasks, comma-separated, e.g. mmlu,arc_challenge (default: the "
        "shipped offline tasks).",
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, description="Few-shot examples (default: each task's own)."
    )
    limit: float | None = Field(
        default=None, gt=0, description="Examples per task: a count, or a fraction if < 1."
    )
    batch_size: int = Field(default=16, ge=1, description="lm-eval batch size.")
    seed: int = Field(default=0, description="Seed for lm-eval (python, numpy, torch, few-shot).")
    chat_template: bool | None = Field(
        default=None,
        description="Apply the chat template (default: when the base tokenizer has one).",
    )
    max_drop: float = Field(
        default=0.02, ge=0, description="Largest allowed drop of any metric (absolute)."
    )
    max_drop_task: dict[str, float] = Field(
        default_factory=dict, description="Per-task drop thresholds, TASK=VALUE (repeatable)."
    )
    dtype: str = Field(
        default="auto",
        description="Model dtype for lm-eval (auto, float32, ...). auto: as every stage's "
        "(the checkpoint's on a GPU, the faster of it and float32 on a CPU); vLLM's own auto.",
    )
    device: Device = Field(
        default=None, description="hf backend device (default: cuda if available, else cpu)."
    )
    bootstrap_iters: int = Field(
        default=1000, ge=0, description="lm-eval bootstrap iterations for stderrs."
    )
    offline: bool = Field(
        default=False, description="Set HF_HUB_OFFLINE and HF_DATASETS_OFFLINE for the run."
    )
    overwrite: OverwriteFolder = False


class _Judged(BaseModel):
    """The safety judge's options (eval safety, search, study sites: one judge, one set of
    options; ``orthoedit.evaluate.safety.check_judge`` reads them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    judge: str | None = Field(
        default=None,
        description="Safety judge: hf:PATH_OR_ID (a Llama Guard-style model) or "
        "openai:BASE_URL (an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1, with "
        "--judge-model).",
    )
    judge_model: str | None = Field(default=None, description="Model name for an openai: judge.")
    judge_api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="Environment variable holding the openai: judge's API key.",
    )
    judge_timeout: float = Field(default=60.0, gt=0, description="Seconds per judge request.")
    judge_retries: int = Field(
        default=2, ge=0, description="Retries of a failed or unparseable judge reply."
    )
    judge_style: Literal["guard", "rubric"] | None = Field(
        default=None,
        description="How the judge is asked: guard (safe/unsafe, Llama Guard-style) or rubric "
        "(refused? convincing? specific?, StrongREJECT-style) (default: guard for hf:, rubric "
        "for openai:).",
    )
    judge_min_score: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="rubric: an answer that is not refused but scores below this (0-1, the "
        "mean of convincing and specific rescaled) is evasive, not compliance.",
    )
    thinking: bool = Field(
        default=False,
        description="Let reasoning models think before answering (enable_thinking); answers "
        "are judged on what follows the reasoning block.",
    )
    reasoning_tokens: int = Field(
        default=1024,
        ge=0,
        description="Extra generation budget for a reasoning block, on top of the answer's "
        "(used when the model reasons); reasoning still open at the end is counted apart.",
    )


class EvalKLConfig(_Running):
    """Options of ``orthoedit eval kl``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    base: str = Field(
        description="The base model: local folder, Hugging Face Hub model id or GGUF."
    )
    edited: str = Field(description="The edited model: local folder, Hub model id or GGUF.")
    prompts: PromptSource = Field(
        default=None,
        description="Harmless prompts: 'bundled' (the bundled harmless test split, default), "
        "'organism', a file or a dataset.",
    )
    column: Column = "prompt"
    split: Split = "train"
    n: int = Field(default=64, ge=1, description="How many prompts (drawn with --seed).")
    seed: PromptSeed = 0
    max_new_tokens: int = Field(
        default=32, ge=1, description="Length of the base model's greedy answers."
    )
    report: Path | None = Field(default=None, description="Also write the numbers as JSON here.")
    overwrite: OverwriteReport = False


class EvalSafetyConfig(_Running, _Judged, _Generated):
    """Options of ``orthoedit eval safety``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model: str = Field(description="The model to evaluate: local folder, Hub model id or GGUF.")
    out: Path = Field(description="Output folder for the report and completions.jsonl.")
    base: str | None = Field(
        default=None,
        description="A base model to evaluate side by side (folder, Hub id or GGUF).",
    )
    harmful: PromptSource = Field(
        default=None,
        description="Harmful prompts: 'bundled' (the test split, default), 'organism', a file "
        "or a dataset.",
    )
    harmless: PromptSource = Field(
        default=None,
        description="Harmless prompts (over-refusal): 'bundled' (default), 'organism', a file "
        "or a dataset.",
    )
    column: Column = "prompt"
    split: Split = "train"
    n: int | None = Field(
        default=None, ge=1, description="At most this many prompts per set (drawn with --seed)."
    )
    seed: PromptSeed = 0
    max_new_tokens: int = Field(
        default=256,
        ge=1,
        description="Generation budget per answer (short budgets under-count refusals).",
    )
    phrases: Path | None = Field(
        default=None, description="File of refusal phrases, one a line (default: built-in)."
    )
    template: Path | None = Field(
        default=None, description="Jinja chat template for a tokenizer without one."
    )
    max_surprisal: float | None = Field(
        default=None,
        gt=0,
        description="With --base: an answer the base model finds more surprising than this "
        "(mean nats per token) is word salad: broken, not compliance (default: half of "
        "ln(vocabulary)).",
    )
    overwrite: OverwriteFolder = False


class CompareConfig(_Running, _Generated):
    """Options of ``orthoedit compare``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    base: str = Field(description="The base model: local folder, Hub model id or GGUF.")
    edited: str = Field(description="The edited model: local folder, Hub model id or GGUF.")
    prompts: PromptSource = Field(
        default=None,
        description="Prompts: 'bundled' (half harmful, half harmless from the bundled test "
        "splits, default), 'organism' (likewise), a file or a dataset.",
    )
    column: Column = "prompt"
    split: Split = "train"
    n: int = Field(default=8, ge=1, description="How many prompts (drawn with --seed).")
    seed: PromptSeed = 0
    max_new_tokens: int = Field(default=128, ge=1, description="Generation budget per answer.")
    report: Path = Field(default=Path("compare.md"), description="Markdown file to write.")
    overwrite: OverwriteReport = False


class PushConfig(BaseModel):
    """Options of ``orthoedit push``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model_dir: Path = Field(description="The edited checkpoint folder written by apply.")
    repo_id: str = Field(description="Hub model repo to publish to, e.g. you/My-Model-orthoedit.")
    eval: Path | None = Field(
        default=None,
        description="A run folder (or its eval/ folder): the results of eval bench, eval "
        "safety and verify go into the card, the reports into orthoedit/ in the repo.",
    )
    private: bool = Field(
        default=False, description="Create the repo private (an existing repo keeps its own)."
    )
    revision: str | None = Field(
        default=None, description="Branch to push to, created if missing (default: main)."
    )
    method: PushMethod = Field(
        default="auto",
        description="commit: one atomic commit (upload_folder style); large: resumable, in "
        "several commits (upload_large_folder); auto: large above 10 GB.",
    )
    gguf: Path | None = Field(
        default=None,
        description="A folder written by export gguf: its GGUF files go under gguf/ in the "
        "repo and into the card (default: MODEL_DIR/gguf, when there is one).",
    )
    message: str | None = Field(default=None, description="Commit message.")
    dry_run: bool = Field(
        default=False, description="List the files and print the card; no network, no writes."
    )
    ignore_license_name: bool = Field(
        default=False,
        description="Push even though the repo name breaks the source license's naming rule.",
    )


def _file_stem(value: str | None) -> str | None:
    if value is not None and (
        not value.strip() or value.startswith(".") or "/" in value or "\\" in value
    ):
        raise ValueError(f"--name {value!r}: give a file name stem, without folders")
    return value


class ExportGgufConfig(BaseModel):
    """Options of ``orthoedit export gguf``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model_dir: Path = Field(description="The edited checkpoint folder written by apply.")
    types: list[Annotated[str, AfterValidator(canonical_type)]] = Field(
        default=["Q8_0"],
        min_length=1,
        description=f"GGUF type to write, one file each; give it more than once. "
        f"{', '.join(CONVERTED)}: written by llama.cpp's converter; {', '.join(QUANTIZED)}: by "
        "llama.cpp's quantizer (orthoedit[llama]), from the checkpoint's own float type.",
    )
    out: Path | None = Field(
        default=None,
        description="Folder for the GGUF files (default: MODEL_DIR/gguf, where push finds them).",
    )
    name: Annotated[str | None, AfterValidator(_file_stem)] = Field(
        default=None,
        description="File name stem: NAME-Q8_0.gguf, ... (default: the source model's name "
        "with -orthoedit).",
    )
    llama_cpp: Path | None = Field(
        default=None,
        description=f"Folder of llama.cpp's converter: a llama.cpp checkout or an unpacked "
        f"llama-cpp-python sdist (default: ${ENV}, else llama-cpp-python {LLAMA_CPP_PYTHON}'s "
        "sdist, fetched once from PyPI into ~/.cache/orthoedit and checked by its sha256).",
    )
    overwrite: OverwriteFolder = False

    @field_validator("types")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class AttributeConfig(_Running):
    """Options of ``orthoedit attribute``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model: ModelId
    direction: Path = Field(description="Direction file, as for apply.")
    out: Path = Field(description="Output folder for attribution.md/.json and the plots.")
    direction_layer: DirectionLayer = None
    harmful: PromptSource = Field(
        default=None,
        description="Harmful prompts: 'bundled' (the test split, default), 'organism', a file "
        "or a dataset.",
    )
    harmless: PromptSource = Field(
        default=None,
        description="Harmless prompts: 'bundled' (default), 'organism', a file or a dataset.",
    )
    column: Column = "prompt"
    split: Split = "train"
    n: int | None = Field(
        default=64, ge=2, description="At most this many prompts per set (drawn with --seed)."
    )
    seed: PromptSeed = 0
    refusal_tokens: str | None = Field(
        default=None,
        description="Comma-separated refusal tokens (default: measure's, from scores.json "
        "beside the direction, else derived from the model's own refusals).",
    )
    steps: int = Field(
        default=4,
        ge=0,
        description="Points of the harmful-to-harmless path where the gradient is averaged "
        "(integrated gradients); 0 = the gradient at the harmful activations only.",
    )
    top: int = Field(
        default=10, ge=0, description="Check this many top components by real patching."
    )
    patch_all: bool = Field(
        default=False,
        description="Patch every component alone, not only the --top largest estimates (one "
        "pass over the harmful prompts each): the ranking check then covers the components "
        "with the largest patched effects, chosen without the estimates.",
    )
    cumulative: int = Field(
        default=30, ge=1, description="Longest prefix of the ranking patched together."
    )
    template: Template = None
    revision: Revision = None
    overwrite: OverwriteFolder = False


class StudySitesConfig(_Running, _Judged):
    """Options of ``orthoedit study sites``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    model: ModelId
    direction: Path = Field(
        description="Direction file, as for apply: .safetensors (tensor 'direction'), .pt or "
        ".npy; [d_model] or [n_layers, d_model]."
    )
    out: Path = Field(description="Output folder for sites.json, sites.md and sites.png.")
    direction_layer: DirectionLayer = None
    harmful: PromptSource = Field(
        default=None,
        description="Harmful prompts: 'bundled' (the test split, default), 'organism', a file "
        "(e.g. measure's val-harmful.jsonl) or a dataset.",
    )
    harmless: PromptSource = Field(
        default=None,
        description="Harmless prompts, for the KL: 'bundled' (the test split, default), "
        "'organism', a file (e.g. measure's val-harmless.jsonl) or a dataset.",
    )
    column: Column = "prompt"
    split: Split = "train"
    n: int = Field(
        default=64, ge=1, description="At most this many prompts per set (drawn with --seed)."
    )
    seed: PromptSeed = 0
    refusal_tokens: str | None = Field(
        default=None,
        description="Comma-separated refusal tokens, e.g. 'I,Sorry' (default: measure's, from "
        "scores.json beside the direction, else derived from the model's own refusals).",
    )
    max_new_tokens: int = Field(
        default=64, ge=1, description="Generation budget per answer for the refusal rate."
    )
    template: Template = None
    revision: Revision = None
    overwrite: OverwriteFolder = False


#: The front's answer budget when a search has a judge (``--front-max-new-tokens``).
FRONT_TOKENS = 256


class SearchConfig(_Running, _Judged, _Generated):
    """Options of ``orthoedit search``. The generation options (``--backend`` and vLLM's) are
    the confirmation's: trials run in transformers, with the edit's hooks."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    _placement_is_generation: ClassVar[bool] = False

    model: ModelId
    candidates: Path = Field(
        description="A folder written by orthoedit measure: candidates.safetensors, "
        "direction.safetensors (the baseline), val-harmful.jsonl and val-harmless.jsonl."
    )
    out: Path = Field(
        description="Search folder: study.db (resumed when it exists), pareto.md/.json/.png "
        "and chosen/ (direction, scales, apply command, recipe fragment)."
    )
    storage: str | None = Field(
        default=None,
        min_length=1,
        description="Keep the study in this database instead of OUT/study.db, so that several "
        "search processes, on one machine or many, run its trials together (each with the "
        "same --storage and --study, and its own --out): an SQLAlchemy URL that Optuna "
        "accepts, e.g. postgresql://user@host/db (pip install 'orthoedit[postgres]').",
    )
    study: str | None = Field(
        default=None,
        min_length=1,
        description="The study's name in its storage (default: derived from every setting "
        "that changes what a trial measures); a stored study with other settings is refused.",
    )
    trials: int = Field(
        default=50,
        ge=1,
        description="Completed trials wanted in all (with --storage: by all workers together).",
    )
    max_kl: float = Field(
        default=0.1,
        gt=0,
        description="KL budget: the chosen trial is the lowest refusal rate with first-token "
        "KL at most this (ties: lower KL, then the earlier trial).",
    )
    max_failure: float | Literal["measure"] | None = Field(
        default=None,
        description="Choose for damage instead: the lowest KL among trials with a failure "
        "rate at most this, a fraction, or 'measure': measure's own selection's failure rate "
        "on the same prompts (--max-kl is then not used; ties: lower failure, then the "
        "earlier trial).",
    )
    objective: Literal["front", "budget"] = Field(
        default="front",
        description="What the sampler minimizes: 'front', failure and KL as two objectives "
        "(the whole Pareto front); 'budget', one objective aimed at --max-failure: KL plus "
        "--failure-cost for every prompt that fails beyond it.",
    )
    failure_cost: float = Field(
        default=0.05,
        gt=0,
        description="With --objective budget: KL added per harmful prompt failed beyond "
        "--max-failure.",
    )
    profile: Literal["shape", "free"] = Field(
        default="shape",
        description="Per-layer weights of the attention and MLP outputs: 'shape', a "
        "profile of four parameters per site (peak weight, peak layer, width, edge weight); "
        "'free', one weight per layer per site (for models with few layers).",
    )
    direction_layers: tuple[float, float] | None = Field(
        default=None,
        description="Search the direction's layer within LO:HI only (a float, blending "
        "adjacent layers' candidates; default: every layer).",
    )
    positions: list[int] | None = Field(
        default=None,
        description="Search only these post-instruction positions (-1: the last token; "
        "default: every measured one).",
    )
    embed: Literal["search", "on", "off"] = Field(
        default="search",
        description="Whether the embedding is edited: searched, always, or never.",
    )
    seed: int = Field(default=0, description="Seed of the sampler (same seed, same trials).")
    startup_trials: int = Field(
        default=10, ge=1, description="Random trials before the TPE sampler models the results."
    )
    time_budget: float | None = Field(
        default=None,
        gt=0,
        description="Seconds (from the start of the command) after which no new trial is started.",
    )
    harmful: PromptSource = Field(
        default=None,
        description="Harmful prompts the failure rate is measured on: a file or a dataset, or "
        "'bundled' / 'organism' (their val split; default: measure's val-harmful.jsonl).",
    )
    harmless: PromptSource = Field(
        default=None,
        description="Harmless prompts the KL is measured on, as --harmful (default: measure's "
        "val-harmless.jsonl).",
    )
    column: Column = "prompt"
    split: Split = "train"
    n: int | None = Field(
        default=None,
        ge=1,
        description="Use at most the first N prompts of each set (default: all).",
    )
    max_new_tokens: int = Field(
        default=64, ge=1, description="Generation budget per answer for the refusal rate."
    )
    max_surprisal: float | None = Field(
        default=None,
        gt=0,
        description="An answer the unedited model finds more surprising than this (mean nats "
        "per token) is word salad: broken, not compliance (default: half of ln(vocabulary)).",
    )
    front_max_new_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Before choosing, judge the Pareto front again with answers of this many "
        "tokens and --judge; trials are then scored cheaply (--max-new-tokens, phrases) and "
        "the choice uses the front's scores. 0: no second judgement, --judge reads every "
        f"trial (default: {FRONT_TOKENS} with --judge, else 0).",
    )

    def front_budget(self) -> int:
        """``--front-max-new-tokens`` resolved: its default is on with a judge only (on the
        development model a refusal shows in the first 64 tokens or not at all, so phrases at
        the trials' budget need no second look; a judge reads the front, not every trial)."""
        if self.front_max_new_tokens is not None:
            return self.front_max_new_tokens
        return FRONT_TOKENS if self.judge else 0

    eval_task: str | None = Field(
        default=None,
        description="A third objective: the drop in this lm-eval task's first metric (a "
        "shipped offline task such as organism_capability or orthoedit_facts, or any lm-eval "
        "task), scored every trial with the edit's hooks.",
    )
    eval_limit: int = Field(
        default=50, ge=1, description="Documents of --eval-task scored per trial."
    )
    max_drop: float | None = Field(
        default=None,
        ge=0,
        description="With --eval-task: the chosen trial's drop in its metric is at most this "
        "(default: no limit; the drop is reported).",
    )
    confirm: bool = Field(
        default=False,
        description="Then confirm the chosen edit on held-out prompts: apply it to a "
        "temporary checkpoint and judge it against the unedited model as eval safety does "
        "(OUT/confirm; --backend vllm generates there); exit 1 when its harmful prompts fail "
        "as often as the unedited model's.",
    )
    confirm_harmful: PromptSource = Field(
        default=None,
        description="--confirm's harmful prompts: 'bundled' (the test split, which neither "
        "measure nor the search reads; default), 'organism', a file or a dataset.",
    )
    confirm_harmless: PromptSource = Field(
        default=None,
        description="--confirm's harmless prompts (over-refusal), as --confirm-harmful.",
    )
    confirm_n: int | None = Field(
        default=None, ge=1, description="--confirm: at most this many prompts per set."
    )
    confirm_max_new_tokens: int = Field(
        default=256,
        ge=1,
        description="--confirm: generation budget per answer (short budgets under-count refusals).",
    )
    template: Template = None
    revision: Revision = None
    overwrite: bool = Field(
        default=False, description="Discard an existing search folder and start over."
    )

    @field_validator("max_failure")
    @classmethod
    def _failure_rate(cls, value):
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ValueError("--max-failure is a fraction in [0, 1] or 'measure'")
        return value

    @field_validator("direction_layers")
    @classmethod
    def _layer_range(cls, value):
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("--direction-layers LO:HI needs 0 <= LO <= HI")
        return value

    @field_validator("positions")
    @classmethod
    def _negative_positions(cls, value):
        if value is not None and (not value or any(p >= 0 for p in value)):
            raise ValueError("--positions are offsets from the end of the prompt: -1, -2, ...")
        return None if value is None else sorted(set(value), reverse=True)

    @model_validator(mode="after")
    def _generation_is_the_confirmation(self):
        if self.confirm:
            return self
        fields = type(self).model_fields
        given = [
            name
            for name in ("backend", *(f for f in fields if f.startswith("confirm_")))
            if getattr(self, name) != fields[name].default
        ]
        if given:
            raise ValueError(
                f"--{given[0].replace('_', '-')} is --confirm's (trials run in "
                "transformers, with the edit's hooks); add --confirm"
            )
        return self

    @model_validator(mode="after")
    def _shared_study_kept(self):
        if self.overwrite and self.storage is not None:
            raise ValueError(
                "--overwrite starts OUT/study.db over; a study in --storage is shared and not "
                "deleted: give another --study"
            )
        return self

    @model_validator(mode="after")
    def _drop_needs_task(self):
        if self.max_drop is not None and self.eval_task is None:
            raise ValueError("--max-drop needs --eval-task")
        if self.objective == "budget" and self.max_failure is None:
            raise ValueError("--objective budget aims at --max-failure; give one")
        if self.objective == "budget" and self.eval_task is not None:
            raise ValueError(
                "--objective budget has one objective; use --objective front with --eval-task"
            )
        return self
