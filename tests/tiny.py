"""Tiny, randomly initialised Hugging Face causal LMs, built in-process.

The tests need real checkpoints of every supported architecture family, but must run offline
and in seconds (a testing module: it lives with the tests, not in the package).
:func:`build_tiny_model` builds one from the real ``transformers`` config class (two layers,
width 32 by default), re-initialises its weights so that the logits are far from trivial (so
that a test comparing logits can actually fail), and saves it the way the Hub does: sharded
safetensors with an index, ``config.json``, ``generation_config.json`` and a byte-level BPE
tokenizer with a Jinja chat template.

Wherever a config accepts an explicit ``head_dim`` it is set so that heads × head_dim ≠ hidden
(4 × 12 = 48 ≠ 32 by default): an axis transposed by mistake then fails loudly instead of hiding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "olmo2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
)

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
)

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] | trim + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# The BPE merges are learnt from these ~400 common English words (all of them end up as whole
# tokens), so that ordinary prompts tokenize to mostly whole words. Any other text still
# tokenizes, byte by byte: byte-level BPE has no unknown token.
_CORPUS = """
How What Why When Where Who Which Can Could Would Should Is Are Do Does Did Please Tell Write
Give Explain Describe List Make I You We They He She It The A An This That These Those My Your
how what why when where who which can could would should is are do does did please tell write
give explain describe list make i you we they he she it the a an this that these those my your
me us them our their his her its to of in on at for with from by about as into over under
after before between through during without and or but not no yes if then so because than
too very more most less few many much some any all each every other another same such only
also just still even again here there now today tomorrow yesterday always never often sometimes
be been being was were am have has had will shall may might must get got go went going come
came see saw look find found take took use used know knew think thought want need like love
help start stop keep let put say said ask work call try feel leave turn show play run move
live believe hold bring happen learn change follow read build cook bake eat drink sleep walk
talk open close buy sell pay send meet speak grow draw drive fly swim sing teach understand
bread cake water coffee tea food dinner lunch breakfast recipe kitchen oven flour sugar salt
egg milk butter cheese apple fruit house home room door window car road city country world
day night week month year time morning evening people person man woman child friend family
school book story word name question answer problem idea way thing place part number point
money job computer phone music movie game sport dog cat bird tree flower garden sun moon star
weather rain snow good bad new old big small long short high low great little right left best
better first last next easy hard simple safe happy sad nice kind warm cold hot fast slow free
one two three four five ten hundred thousand hello hi thanks thank sorry okay sure welcome
hello there! How are you? What is the weather like today? How do I bake bread? Can you help me
write a story about a dog? Please explain how a computer works. Tell me a joke. Why is the sky
blue? Where can I find good coffee? What should I cook for dinner tonight? I need some help.
"""

_TOKENIZER_VOCAB = 1024  # an upper bound: the corpus runs out of merges at about 1000 tokens


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with chat special tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _CORPUS.split()
    # Mid-sentence words follow a space ("Ġword"); capitalised ones also start sentences.
    texts = [" " + " ".join(words), *(w for w in words if w[0].isupper())]
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _config(
    family: str, *, hidden: int, n_layers: int, vocab: int, ids: dict[str, int], bias: bool
) -> PretrainedConfig:
    head_dim = 2 * (3 * hidden // 16)  # 12 for hidden 32: 4 heads × head_dim = 1.5 × hidden
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 3 * hidden // 2,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **ids,
    }
    explicit_head = {"head_dim": head_dim}
    if family == "llama":
        return transformers.LlamaConfig(
            **common, **explicit_head, attention_bias=bias, mlp_bias=bias
        )
    if family == "mistral":
        return transformers.MistralConfig(**common, **explicit_head, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, **explicit_head)
    if family == "gemma":
        return transformers.GemmaConfig(**common, **explicit_head)
    if family in ("gemma2", "gemma3"):
        cls = transformers.Gemma2Config if family == "gemma2" else transformers.Gemma3TextConfig
        # Alternate sliding/full layers like the real models; a window of 64 covers test prompts.
        layer_types = ["sliding_attention", "full_attention"] * n_layers
        return cls(
            **common,
            **explicit_head,
            query_pre_attn_scalar=head_dim,
            sliding_window=64,
            layer_types=layer_types[:n_layers],
        )
    if family == "phi3":
        return transformers.Phi3Config(**common, original_max_position_embeddings=512)
    if family == "olmo2":
        return transformers.Olmo2Config(**common)
    if family == "mixtral":
        return transformers.MixtralConfig(
            **common, **explicit_head, num_local_experts=4, num_experts_per_tok=2
        )
    if family in ("qwen2_moe", "qwen3_moe"):
        # Layer 1 is dense (mlp_only_layers), as some real checkpoints mix the two.
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": hidden // 2}
        moe["mlp_only_layers"] = [1] if n_layers > 1 else []
        if family == "qwen2_moe":
            return transformers.Qwen2MoeConfig(
                **common, **moe, shared_expert_intermediate_size=hidden
            )
        return transformers.Qwen3MoeConfig(**common, **explicit_head, **moe)
    if family == "gpt_oss":
        layer_types = ["sliding_attention", "full_attention"] * n_layers
        return transformers.GptOssConfig(
            **common,
            **explicit_head,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=64,
            layer_types=layer_types[:n_layers],
            # YaRN's factor must match max positions / original positions (512 / 16)
            rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 16, "rope_theta": 150000.0},
        )  # fmt: skip
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_inner=3 * hidden // 2,
            n_layer=n_layers,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


@torch.no_grad()
def _reinit(model: torch.nn.Module, *, offset_norms: bool) -> None:
    """Large random weights, so that the logits are far from uniform (std > 1)."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.3)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
        else:  # a norm's scale; Gemma-family norms compute x * (1 + weight)
            p.normal_(0.0, 0.3)
            if offset_norms:
                p.add_(1.0)


def build_tiny_model(
    family: str,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    tie: bool | None = None,
    bias: bool = False,
    n_layers: int = 2,
    hidden: int = 32,
    seed: int = 0,
    max_shard_size: str | int = "20KB",
) -> Path:
    """Build, save (safetensors, config.json, generation_config.json, tokenizer + chat template)
    and return ``out_dir``.

    ``tie=None`` keeps the family's own default (tied for gemma*/gpt2, untied otherwise).
    ``bias=True`` (llama only) sets ``attention_bias`` and ``mlp_bias``, so ``o_proj`` and
    ``down_proj`` carry biases. The default ``max_shard_size`` of 20KB saves even a 2-layer
    model as several shards with ``model.safetensors.index.json``; pass e.g. "1GB" for a single
    ``model.safetensors``. Weights are a deterministic function of ``seed``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if bias and family != "llama":
        raise ValueError("bias=True is only supported for the llama family")
    if hidden < 16 or hidden % 8:
        raise ValueError(f"hidden must be a multiple of 8 and at least 16, got {hidden}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = -(-len(tokenizer) // 64) * 64  # round up, as real checkpoints do
    config = _config(family, hidden=hidden, n_layers=n_layers, vocab=vocab, ids=ids, bias=bias)
    if tie is not None:
        config.tie_word_embeddings = tie

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _reinit(model, offset_norms=not family.startswith("gemma"))
    model.eval()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a ~300 KB model
    try:
        model.to(dtype).save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    GenerationConfig(do_sample=False, max_new_tokens=32, **ids).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
