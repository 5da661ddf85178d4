"""Running a chat model: its chat template (the rendering every stage uses, the
post-instruction tokens), batching (length-sorted, left-padded, the shared template prefix
run once), placement on devices and the loading options. Used by every stage that runs a
model: measure, search, the evaluations, study and attribute."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DEVICE_MAPS
from ..errors import BadInputError
from ..model.gguf import is_gguf
from ..progress import Progress
from .batching import (
    SharedPrefix,
    batched_forward,
    input_device,
    left_padded,
    length_sorted_batches,
    pads_safely,
)

SENTINEL = "Orthoedit sentinel message"
THINKING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))


# Templates that print today's date (Llama 3.x: "Today Date: ...") see this one instead, so
# renderings, and everything hashed downstream of them, do not change from day to day. It is
# the date Llama 3.1's own template falls back to.
PINNED_DATE = datetime.date(2024, 7, 26)


def template_kwargs() -> dict:
    """Extra chat-template variables: the pinned date as Llama 3's ``date_string``. (A
    template that calls ``strftime_now`` for itself still sees today: transformers turns
    template variables into strings, so the function cannot be replaced.)"""
    return {"date_string": PINNED_DATE.strftime("%d %b %Y")}


def read_template(path: Path) -> str:
    """A ``--template`` file's text (a Jinja chat template), or a clear error."""
    if not Path(path).is_file():
        raise BadInputError(f"--template {path} does not exist.")
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"--template {path}: cannot read it as UTF-8 text ({err}).") from None


def render(tok, prompt: str, system: str | None = None, thinking: bool = False) -> str:
    """One user turn (after an optional system prompt) and the generation prompt, as text.

    Reasoning models are asked not to think (``enable_thinking=False``, ignored by templates
    that do not know it), so the first generated token is the answer's, unless ``thinking``.
    Dates are pinned (``PINNED_DATE``).
    """
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    try:
        return tok.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=thinking,
            **template_kwargs(),
        )
    except Exception as err:  # jinja raises for e.g. a system turn the template rejects
        raise BadInputError(f"the chat template cannot render this conversation: {err}") from None


def pad_id(tok) -> int:
    """The token left padding uses: the tokenizer's pad token, else its end of sequence."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def post_instruction_ids(tok, system: str | None = None) -> list[int]:
    """Token ids the template puts between the end of the user message and the answer."""
    if not getattr(tok, "chat_template", None):
        raise BadInputError(
            "the tokenizer has no chat template; pass --template FILE with a Jinja chat template."
        )
    text = render(tok, SENTINEL, system)
    at = text.rfind(SENTINEL)
    if at < 0:
        raise BadInputError("the chat template drops the user message; cannot find positions.")
    end = at + len(SENTINEL)
    tail = text[end:]
    for opening, closing in THINKING_TAGS:
        if tail.rfind(opening) > tail.rfind(closing):
            raise BadInputError(
                f"the chat template opens a thinking block ({opening!r}) where the answer should "
                "start, even with enable_thinking=False; first-token scores would measure the "
                "reasoning, not the answer, so this template is not supported (pass --template "
                "FILE with one that closes the block)."
            )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ids = [i for i, (start, _) in pairs if start >= end]
    if not ids:
        raise BadInputError("the chat template adds no tokens after the user message.")
    return ids


def chat_ids(tok, prompts: list[str], post: list[int], system: str | None) -> list[list[int]]:
    """Token ids of each prompt's chat rendering; each must end with the post-instruction ids."""
    out = []
    for prompt in prompts:
        ids = tok(render(tok, prompt, system), add_special_tokens=False)["input_ids"]
        if ids[-len(post) :] != post:
            raise BadInputError(
                f"prompt {prompt[:40]!r}: its rendering does not end with the template's "
                "post-instruction tokens (the tokenizer merges across the message boundary)."
            )
        out.append(ids)
    return out


def placement(model) -> dict[str, int]:
    """Modules per device of a ``device_map`` (``{"cpu": n}`` when the model was not
    dispatched): the record says where the measurement ran, offload included."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {str(input_device(model)): 1}
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return dict(sorted(counts.items()))


def parse_max_memory(spec: str | None) -> dict | None:
    """``--max-memory "0=70GiB,cpu=120GiB"`` -> accelerate's ``{0: "70GiB", "cpu": "120GiB"}``."""
    if spec is None:
        return None
    limits: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise BadInputError(
                f"--max-memory {spec!r}: expected DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=120GiB."
            )
        limits[int(key) if key.isdigit() else key] = value
    return limits


def start_stage(device: str | None, progress: Progress | None = None) -> Progress:
    """What a stage that runs a model does first: a device this machine lacks is bad input
    before anything loads, and the stage's own progress is the only bar shown (transformers'
    loading bars off). Returns ``progress``, or a new one."""
    import transformers

    check_device(device)
    transformers.utils.logging.disable_progress_bar()
    return progress or Progress()


def check_device(device: str | None) -> None:
    """Bad input, before any model loads: a device this machine does not have. (The options
    only check that torch can name it: a recipe may be validated on another machine.)"""
    if device is None or device in DEVICE_MAPS:
        return
    kind = torch.device(device)
    if kind.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise BadInputError(
                f"--device {device}: this machine has no CUDA device that torch "
                f"{torch.__version__} can use; leave --device out to run on the CPU."
            )
        if kind.index is not None and kind.index >= n:
            raise BadInputError(
                f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}."
            )
    elif kind.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=kind)
        except (RuntimeError, AssertionError) as err:
            raise BadInputError(f"--device {device}: not usable here ({err}).") from None


# --- loading: one way for every command --------------------------------------------------


def load_tokenizer(folder: Path, template: Path | None = None):
    """The model's tokenizer, with ``--template``'s chat template instead of its own (a
    GGUF's: the tokenizer and chat template its metadata holds)."""
    from transformers import AutoTokenizer

    from ..model.source import pretrained

    where, options = pretrained(folder)
    tok = AutoTokenizer.from_pretrained(where, **options)
    if template is not None:
        tok.chat_template = read_template(template)
    return tok


def load_model(
    folder: Path,
    dtype: str = "float32",
    device: str | None = None,
    max_memory: str | None = None,
    offload_folder: Path | None = None,
    log: Callable[[str], None] | None = None,
):
    """The model in eval mode, placed by ``device_map``: None is the CPU, a device puts every
    module there, ``auto`` (and the other strategies) spreads them with accelerate, capped by
    ``max_memory`` and spilling to ``offload_folder``. (The device is checked by
    ``check_device`` where the command starts.) ``dtype`` ``auto``: the one this machine runs
    the checkpoint fastest in (``runtime.precision``), said to ``log``."""
    from .precision import AUTO, resolve_dtype

    if dtype == AUTO:
        choice = resolve_dtype(dtype, folder, device)
        dtype = choice.dtype
        if log is not None:
            log(choice.note)
    # use_kernels=False: with the `kernels` package installed, transformers would swap layers
    # (rotary, norms, activations) for kernels fetched from the Hub when the model is on a
    # GPU: not offline, and not the plain PyTorch layers the hooks and verify reason about.
    kwargs: dict = {"dtype": getattr(torch, dtype), "device_map": device, "use_kernels": False}
    from ..model.quant import dequantized
    from ..model.source import pretrained

    if dtype == "float64":  # grouped expert matmuls have no float64 kernel: loop the experts
        kwargs["experts_implementation"] = "eager"
    if (max_memory or offload_folder) and device not in DEVICE_MAPS:
        raise BadInputError("--max-memory and --offload-folder need --device auto.")
    if max_memory:
        kwargs["max_memory"] = parse_max_memory(max_memory)
    if offload_folder:
        kwargs["offload_folder"] = str(offload_folder)
    where, options = pretrained(folder)  # a GGUF: checked whole; transformers dequantizes it
    if not is_gguf(folder):
        options |= dequantized(folder)  # FP8 and MXFP4: loaded dequantized
    with _quiet_gguf(folder):
        return model_class(folder).from_pretrained(where, **kwargs, **options).eval()


def _quiet_gguf(folder: Path):
    """transformers' GGUF loader draws a tqdm bar of its own, which its logging settings do
    not reach; turned off, so that the stage's progress stays the only one shown."""
    import contextlib
    import functools
    from unittest import mock

    if not is_gguf(folder):
        return contextlib.nullcontext()
    import transformers.modeling_gguf_pytorch_utils as loader

    if not hasattr(loader, "tqdm"):  # another transformers: nothing to quiet
        return contextlib.nullcontext()
    return mock.patch.object(loader, "tqdm", functools.partial(loader.tqdm, disable=True))


def model_class(folder: Path):
    """The class config.json names (``architectures[0]``), so that a multimodal checkpoint
    loads whole, its towers included, as it was saved; ``AutoModelForCausalLM`` where the
    name is not one of transformers' classes, and for a GGUF (transformers reads causal LMs
    only from GGUFs)."""
    import transformers

    if is_gguf(folder):
        return transformers.AutoModelForCausalLM
    try:
        arch = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        arch = []
    cls = getattr(transformers, arch[0], None) if arch and isinstance(arch[0], str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModelForCausalLM


@dataclass(frozen=True)
class Placement:
    """Where and in what a model runs, as a stage config's placement options
    (``config._Placed``) say it: for callers without a config."""

    dtype: str = "auto"
    device: str | None = None
    max_memory: str | None = None
    offload_folder: Path | None = None


def load_placed(folder: Path, where, dtype: str | None = None, log=None):
    """``load_model`` with the placement options of ``where`` (a stage config or a
    ``Placement``: dtype, device, max_memory, offload_folder); ``dtype`` overrides its dtype;
    ``log`` hears which dtype ``auto`` chose. Every stage loads its models through here."""
    return load_model(
        folder, dtype or where.dtype, where.device, where.max_memory, where.offload_folder, log
    )


def run_dtype(folder: Path, where) -> str:
    """The dtype ``load_placed(folder, where)`` runs the model in (``auto`` resolved): what a
    stage records."""
    from .precision import resolve_dtype

    return resolve_dtype(where.dtype, folder, where.device).dtype


@torch.no_grad()
def greedy_completions(
    model,
    rows: list[list[int]],
    batch_size: int,
    pad: int,
    new_tokens: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Token ids of greedy completions (at most ``new_tokens``), one list per row, generated
    in length-sorted left-padded batches. Rows that finish early are padded by ``generate``;
    see ``until_stop``.

    The prefix all rows share (a chat template's system prompt) runs once, through whatever
    hooks are active, and every batch continues from a copy of its key/value cache: the tails
    are left-padded after it and masked, so positions count real tokens only and each row sees
    what it would see alone (as in ``runtime.batched_forward``)."""
    device = input_device(model)
    prefix = SharedPrefix(model, rows)
    result: dict[int, list[int]] = {}
    equal = not pads_safely(model)
    for batch in length_sorted_batches([len(r) for r in rows], batch_size, equal):
        enc = left_padded([rows[i][prefix.n :] for i in batch], pad, device)
        enc.pop("position_ids")  # generate derives them from the mask
        extra: dict = {}
        if prefix.n:  # generate takes the whole ids and skips what the cache holds
            enc["input_ids"] = torch.cat([prefix.ids.expand(len(batch), -1), enc["input_ids"]], 1)
            enc["attention_mask"] = prefix.mask(enc["attention_mask"])
            extra["cache"] = prefix.cache_for(len(batch))
        ids = model.generate(
            **enc, **extra, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )
        for i, row in zip(batch, ids[:, enc["input_ids"].shape[1] :].cpu().tolist(), strict=True):
            result[i] = row
        if progress:
            progress(len(batch))
    return [result[i] for i in range(len(rows))]


def until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """A completion cut after its first stop token."""
    end = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
    return ids[:end]


@dataclass
class Generated:
    """One greedy answer: its token ids (cut after the first stop token) and its text."""

    ids: list[int]
    text: str


def generate(session, rows: list[list[int]], new_tokens: int, progress=None) -> list[Generated]:
    """Greedy answers to token rows within ``new_tokens``, cut and decoded (special tokens
    skipped). ``session``: a ``Session``, a ``runtime.vllm_engine.VllmSession`` or a
    ``runtime.llama_cpp.LlamaCppSession``: every backend answers the same ``complete`` call,
    and every answer a stage judges is made here."""
    made = session.complete(rows, new_tokens, progress)
    stop, tok = session.stop, session.tok
    cut = [until_stop(ids, stop) for ids in made]
    return [Generated(ids, tok.decode(ids, skip_special_tokens=True).strip()) for ids in cut]


def stop_ids(model, tok, generation_config=None) -> set[int]:
    """The tokens that end an answer: the generation config's EOS ids (``model``'s, or
    ``generation_config`` where no model is loaded) and the tokenizer's."""
    eos = (generation_config or model.generation_config).eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or [])
    return {i for i in (*ids, tok.eos_token_id) if i is not None}


def vocab_size(model) -> int:
    """Rows of the model's unembedding."""
    return model.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def surprisal(
    model, rows: list[list[int]], completions: list[list[int]], batch_size: int, pad: int
) -> list[float]:
    """Mean surprisal (nats per token) of each completion under ``model`` after its prompt
    row: how implausible the answer is to that model. Empty completions give 0.

    Only the completions' positions are unembedded, one row at a time in float32 (with a
    large vocabulary, the logits of every position of a batch are most of the cost), and the
    prefix the rows share runs once (``runtime.batched_forward``)."""
    out = [0.0] * len(rows)
    which = [i for i, done in enumerate(completions) if done]
    if not which:
        return out
    whole = [rows[i] + completions[i] for i in which]
    keep = max(len(completions[i]) for i in which) + 1
    for batch, output in batched_forward(
        model, whole, batch_size, pad, keep=keep, logits_to_keep=keep
    ):
        for j, k in enumerate(batch):
            done = completions[which[k]]
            n = len(done)
            logprobs = torch.log_softmax(output.logits[j, -n - 1 : -1].float(), dim=-1)
            target = torch.tensor(done, device=logprobs.device).unsqueeze(-1)
            out[which[k]] = float(-logprobs.gather(-1, target).mean())
    return out


@dataclass
class Session:
    """A chat model ready to run: model and tokenizer (with the chat template), the system
    prompt, the post-instruction tokens, the pad id and the batch size every pass uses.
    ``Session.open(folder, cfg)`` is how every command that runs a model loads it."""

    folder: Path
    model: object
    tok: object
    system: str | None
    batch_size: int
    post: list[int] = field(default_factory=list)
    pad: int = 0

    @classmethod
    def open(cls, folder: Path, cfg, tok=None, dtype: str | None = None, log=None) -> Session:
        """Load ``folder`` with ``cfg``'s options (its placement, as ``load_placed``;
        ``batch_size``, ``system`` and, where the config has it, ``template``). ``tok``: a
        tokenizer already set up; ``dtype`` overrides ``cfg.dtype``; ``log`` hears which
        dtype ``auto`` chose."""
        tok = tok or load_tokenizer(folder, getattr(cfg, "template", None))
        model = load_placed(folder, cfg, dtype, log)
        system = getattr(cfg, "system", None)
        return cls(
            folder,
            model,
            tok,
            system,
            getattr(cfg, "batch_size", 32),
            post_instruction_ids(tok, system),
            pad_id(tok),
        )

    def rows(self, prompts: list[str]) -> list[list[int]]:
        """Token rows of ``prompts`` in the chat template (``chat_ids``)."""
        return chat_ids(self.tok, prompts, self.post, self.system)

    @property
    def stop(self) -> set[int]:
        """Token ids that end an answer (``stop_ids``)."""
        return stop_ids(self.model, self.tok)

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding (the word-salad line depends on it)."""
        return vocab_size(self.model)

    def complete(self, rows: list[list[int]], new_tokens: int, progress=None) -> list[list[int]]:
        """Greedy completions of token rows (``greedy_completions``); the vLLM
        session (``runtime.vllm_engine``) answers the same call."""
        return greedy_completions(self.model, rows, self.batch_size, self.pad, new_tokens, progress)

    def surprisal(self, rows: list[list[int]], completions: list[list[int]]) -> list[float]:
        """Mean nats per token of each completion after its row (``surprisal``)."""
        return surprisal(self.model, rows, completions, self.batch_size, self.pad)

    def close(self) -> None:
        """Let the model's memory go (the next model of a command may need it)."""
        self.model = None
