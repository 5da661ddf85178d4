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

import functools
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
#: Families added for the models of 2025-26, each with its own table; the heavier stage tests
#: run on ``FAMILIES``, the invariants of the edit (tests/test_families.py) on these too.
NEW_FAMILIES: tuple[str, ...] = (
    "deepseek_v3",
    "glm4_moe",
    "glm4",
    "minimax_m2",
    "smollm3",
    "exaone4",
    "olmo3",
    "mistral4",
    "gemma4_text",
    "gemma4_text_moe",
    "llama4_text",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_next",
    "granite",
    "granitemoehybrid",
    "lfm2",
    "lfm2_moe",
    "falcon_h1",
    "nemotron_h",
    "nemotron_h_latent",
    *(MULTIMODAL := ("gemma3_multimodal", "mistral3", "gemma4", "llama4", "qwen3_5_vl", "lfm2_vl")),
)
#: Tiny families edited with another family's table (variants of one family).
TABLE_OF: dict[str, str] = {
    "olmo3": "olmo2",
    "gemma4_text_moe": "gemma4_text",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_next": "qwen3_5",
    "lfm2_moe": "lfm2",
    "nemotron_h_latent": "nemotron_h",
}
#: Families whose RMSNorms compute x · (1 + weight) (the others: x · weight).
ONE_PLUS_W = ("gemma", "gemma2", "gemma3", "gemma3_multimodal", "qwen3_5", "qwen3_5_moe",
              "qwen3_next", "qwen3_5_vl")  # fmt: skip

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


def _alternating(n_layers: int, first: str, second: str) -> list[str]:
    return ([first, second] * n_layers)[:n_layers]


def _new_config(family: str, common: dict, head_dim: int, n_layers: int) -> PretrainedConfig:
    """The families of ``NEW_FAMILIES``: every layer kind of the family occurs (dense and
    mixture-of-experts, sliding and full attention, with and without RoPE, attention and
    linear-attention, Mamba or convolution mixers), with ``n_layers`` raised where needed."""
    if family in MULTIMODAL:
        common = common | {"vocab_size": common["vocab_size"] + 64}  # room for IMAGE_TOKEN...
    return _NEW[family](common, head_dim, n_layers)


def _moe(hidden: int) -> dict:
    return {"first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "moe_intermediate_size": hidden // 2}  # fmt: skip


def _deepseek_v3(common, head_dim, n_layers):  # multi-head latent attention
    mla = {"q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
           "v_head_dim": head_dim}  # fmt: skip
    return transformers.DeepseekV3Config(
        **common | {"num_key_value_heads": 4}, **mla, **_moe(common["hidden_size"]), n_group=2,
        topk_group=1, attention_bias=True,
    )  # fmt: skip


def _mistral4(common, head_dim, n_layers):
    mla = {"q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
           "v_head_dim": head_dim}  # fmt: skip
    return transformers.Mistral4Config(
        **common | {"num_key_value_heads": 4}, **mla, **_moe(common["hidden_size"])
    )


def _gemma4_text(common, head_dim, n_layers, moe: bool = False):
    """Dense: per-layer inputs, key/value sharing, keys as values, double-wide MLPs. MoE: every
    layer has a dense MLP and experts (enable_moe_block)."""
    n = max(n_layers, 2 if moe else 4)
    extra = (
        {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
         "moe_intermediate_size": common["hidden_size"] // 2}
        if moe
        else {"num_kv_shared_layers": 2, "attention_k_eq_v": True, "use_double_wide_mlp": True}
    )  # fmt: skip
    return transformers.Gemma4TextConfig(
        **common | {"num_hidden_layers": n}, head_dim=head_dim, global_head_dim=2 * head_dim,
        num_global_key_value_heads=1, layer_types=_alternating(n, "sliding_attention",
        "full_attention"), sliding_window=64, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=common["vocab_size"], **extra,
    )  # fmt: skip


def _llama4_text(common, head_dim, n_layers):
    """Layers 1 and 3 mixtures of experts, layer 3 without RoPE, chunked attention."""
    hidden = common["hidden_size"]
    return transformers.Llama4TextConfig(
        **common | {"num_hidden_layers": max(n_layers, 4), "intermediate_size": hidden // 2},
        head_dim=head_dim, intermediate_size_mlp=2 * hidden, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4,
        attention_chunk_size=8, attention_bias=True,
    )  # fmt: skip


def _qwen3_5_text(common, head_dim, n_layers, moe: bool = False, next_: bool = False):
    """Gated DeltaNet layers between full-attention layers."""
    hidden = common["hidden_size"]
    n = max(n_layers, 4)
    linear = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
              "linear_value_head_dim": 16, "head_dim": 32,
              "layer_types": _alternating(n, "linear_attention", "full_attention")}  # fmt: skip
    experts = {"moe_intermediate_size": hidden // 2, "shared_expert_intermediate_size": hidden,
               "num_experts": 4, "num_experts_per_tok": 2}  # fmt: skip
    if next_:
        return transformers.Qwen3NextConfig(
            **common | {"num_hidden_layers": n}, **linear, **experts, mlp_only_layers=[0]
        )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True}  # fmt: skip
    cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
    return cls(**common | {"num_hidden_layers": n}, **linear, rope_parameters=rope,
               **(experts if moe else {}))  # fmt: skip


_MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.0078125, "logits_scaling": 8.0}  # fmt: skip


def _granitemoehybrid(common, head_dim, n_layers):
    """Mamba 2 and attention layers, each with fused experts and a shared MLP."""
    n = max(n_layers, 4)
    hidden = common["hidden_size"]
    return transformers.GraniteMoeHybridConfig(
        **common | {"num_hidden_layers": n, "intermediate_size": hidden // 2},
        shared_intermediate_size=hidden, num_local_experts=4, num_experts_per_tok=2,
        layer_types=_alternating(n, "mamba", "attention"), mamba_n_heads=hidden // 8,
        mamba_n_groups=1, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=8,
        mamba_proj_bias=True, attention_bias=True, position_embedding_type="rope",
        **_MULTIPLIERS,
    )  # fmt: skip


def _lfm2(common, head_dim, n_layers, moe: bool = False):
    """Short-convolution layers between attention layers (LFM2-MoE: experts after layer 0)."""
    n = max(n_layers, 4)
    kwargs = {"block_auto_adjust_ff_dim": False, "conv_bias": True, "conv_L_cache": 3,
              "layer_types": _alternating(n, "conv", "full_attention")}  # fmt: skip
    if moe:
        return transformers.Lfm2MoeConfig(
            **common | {"num_hidden_layers": n}, **kwargs, num_dense_layers=1, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=common["hidden_size"] // 2,
        )  # fmt: skip
    return transformers.Lfm2Config(**common | {"num_hidden_layers": n}, **kwargs)


def _falcon_h1(common, head_dim, n_layers):
    """Attention and Mamba 2 side by side in every block; scalar multipliers everywhere."""
    return transformers.FalconH1Config(
        **common, mamba_d_ssm=2 * common["hidden_size"], mamba_n_heads=8, mamba_n_groups=1,
        mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=8, mamba_proj_bias=True,
        projectors_bias=True, mamba_rms_norm=True, attention_bias=True, mlp_bias=True,
        lm_head_multiplier=0.5, embedding_multiplier=3.0, mlp_multipliers=[0.7, 0.4],
        key_multiplier=0.9, attention_out_multiplier=0.6, attention_in_multiplier=1.3,
        ssm_multipliers=[0.5, 0.6, 0.7, 0.8, 0.9], ssm_in_multiplier=1.1, ssm_out_multiplier=0.3,
    )  # fmt: skip


def _nemotron_h(common, head_dim, n_layers, latent: int | None = None):
    """One mixer per block: Mamba 2, attention, mixture of experts (latent or not), MLP."""
    hidden = common["hidden_size"]
    kinds = ["mamba", "attention", "moe", "mlp"]
    return transformers.NemotronHConfig(
        **common | {"num_hidden_layers": 4}, layers_block_type=kinds, head_dim=head_dim,
        mlp_bias=True, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=1,
        conv_kernel=4, expand=2, chunk_size=8, use_bias=True, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=hidden // 2,
        moe_shared_expert_intermediate_size=hidden, moe_latent_size=latent,
    )  # fmt: skip


#: Token ids of the multimodal families' image (and audio) placeholders, past the tokenizer's.
IMAGE_TOKEN, AUDIO_TOKEN, IMAGE_START, IMAGE_END = 1030, 1031, 1032, 1033
_MM_IDS = {"image_token_index": IMAGE_TOKEN, "boi_token_index": IMAGE_START,
           "eoi_token_index": IMAGE_END}  # fmt: skip


def _vision(**kw) -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, **kw}  # fmt: skip


def _multimodal(family: str, common: dict, head_dim: int, n_layers: int) -> PretrainedConfig:
    """Image-text wrappers around a text model of the family, with one-layer vision towers that
    turn a 32 × 32 image into 4 tokens."""
    text = _config(MULTIMODAL_TEXT[family], hidden=common["hidden_size"], n_layers=n_layers,
                   vocab=common["vocab_size"], ids={}, bias=False).to_dict()  # fmt: skip
    ids = {k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if family == "gemma3_multimodal":
        return transformers.Gemma3Config(
            text_config=text, vision_config=_vision(image_size=32, patch_size=8),
            mm_tokens_per_image=4, **_MM_IDS, **ids,
        )  # fmt: skip
    if family == "mistral3":
        vision = _vision(model_type="pixtral", head_dim=16, patch_size=8, image_size=32)
        return transformers.Mistral3Config(
            text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
            spatial_merge_size=2, multimodal_projector_bias=True, **ids,
        )  # fmt: skip
    if family == "gemma4":
        vision = _vision(num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                         position_embedding_size=64)  # fmt: skip
        audio = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "subsampling_conv_channels": [128, 4], "conv_kernel_size": 3,
                 "output_proj_dims": 48}  # fmt: skip
        return transformers.Gemma4Config(
            text_config=text, vision_config=vision, audio_config=audio,
            image_token_id=IMAGE_TOKEN, audio_token_id=AUDIO_TOKEN, video_token_id=1034,
            boi_token_id=IMAGE_START, eoi_token_id=IMAGE_END, boa_token_id=1035,
            eoa_token_index=1036, **ids,
        )  # fmt: skip
    if family == "llama4":
        vision = _vision(
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
            pixel_shuffle_ratio=0.5,
        )
        return transformers.Llama4Config(text_config=text, vision_config=vision, **_MM_IDS, **ids)
    if family == "qwen3_5_vl":
        vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "num_position_embeddings": 16}  # fmt: skip
        vision["out_hidden_size"] = common["hidden_size"]
        return transformers.Qwen3_5Config(
            text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
            vision_start_token_id=IMAGE_START, vision_end_token_id=IMAGE_END,
            video_token_id=1034, **ids,
        )  # fmt: skip
    vision = _vision(model_type="siglip2_vision_model", patch_size=4, num_patches=16)
    return transformers.Lfm2VlConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
        projector_hidden_size=48, downsample_factor=2, **ids,
    )  # fmt: skip


#: The text family inside each multimodal one.
MULTIMODAL_TEXT = {"gemma3_multimodal": "gemma3", "mistral3": "mistral", "gemma4": "gemma4_text",
                   "llama4": "llama4_text", "qwen3_5_vl": "qwen3_5", "lfm2_vl": "lfm2"}  # fmt: skip
#: Classes AutoModelForCausalLM does not build from these families' configs.
CLASSES = {
    "mistral4": "Mistral4ForCausalLM",
    "gemma3_multimodal": "Gemma3ForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "gemma4": "Gemma4ForConditionalGeneration",
    "llama4": "Llama4ForConditionalGeneration",
    "qwen3_5_vl": "Qwen3_5ForConditionalGeneration",
    "lfm2_vl": "Lfm2VlForConditionalGeneration",
}

_NEW = {
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": lambda c, h, n: transformers.Glm4MoeConfig(
        **c,
        head_dim=h,
        **_moe(c["hidden_size"]),
        n_group=1,
        topk_group=1,
        attention_bias=True,
        use_qk_norm=True,
    ),
    "glm4": lambda c, h, n: transformers.Glm4Config(**c, head_dim=h, attention_bias=True),
    "minimax_m2": lambda c, h, n: transformers.MiniMaxM2Config(
        **c | {"intermediate_size": c["hidden_size"] // 2},
        head_dim=h,
        num_local_experts=4,
        num_experts_per_tok=2,
        rotary_dim=6,
    ),
    "smollm3": lambda c, h, n: transformers.SmolLM3Config(
        **c, no_rope_layer_interval=2, attention_bias=True, mlp_bias=True
    ),
    "exaone4": lambda c, h, n: transformers.Exaone4Config(
        **c,
        head_dim=h,
        sliding_window=64,
        layer_types=_alternating(n, "sliding_attention", "full_attention"),
    ),
    "olmo3": lambda c, h, n: transformers.Olmo3Config(
        **c,
        sliding_window=64,
        attention_bias=True,
        layer_types=_alternating(n, "sliding_attention", "full_attention"),
    ),
    "mistral4": _mistral4,
    "gemma4_text": _gemma4_text,
    "gemma4_text_moe": lambda c, h, n: _gemma4_text(c, h, n, moe=True),
    "llama4_text": _llama4_text,
    "qwen3_5": _qwen3_5_text,
    "qwen3_5_moe": lambda c, h, n: _qwen3_5_text(c, h, n, moe=True),
    "qwen3_next": lambda c, h, n: _qwen3_5_text(c, h, n, next_=True),
    "granite": lambda c, h, n: transformers.GraniteConfig(
        **c, attention_bias=True, mlp_bias=True, **_MULTIPLIERS
    ),
    "granitemoehybrid": _granitemoehybrid,
    "lfm2": _lfm2,
    "lfm2_moe": lambda c, h, n: _lfm2(c, h, n, moe=True),
    "falcon_h1": _falcon_h1,
    "nemotron_h": _nemotron_h,
    "nemotron_h_latent": lambda c, h, n: _nemotron_h(c, h, n, latent=24),
    **{family: functools.partial(_multimodal, family) for family in MULTIMODAL},
}


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
    if family in NEW_FAMILIES:
        return _new_config(family, common, head_dim, n_layers)
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


_DECAYS = ("A_log", "dt_bias", "D")


@torch.no_grad()
def _reinit(model: torch.nn.Module, *, offset_norms: bool) -> None:
    """Large random weights, so that the logits are far from uniform (std > 1). A recurrent
    mixer's decay rates (Mamba's and Gated DeltaNet's A_log, dt_bias, D) keep the values
    transformers gives them: random ones make the recurrence blow up."""
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _DECAYS:
            continue
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
    intermediate: int | None = None,
) -> Path:
    """Build, save (safetensors, config.json, generation_config.json, tokenizer + chat template)
    and return ``out_dir``.

    ``tie=None`` keeps the family's own default (tied for gemma*/gpt2, untied otherwise).
    ``bias=True`` (llama only) sets ``attention_bias`` and ``mlp_bias``, so ``o_proj`` and
    ``down_proj`` carry biases. The default ``max_shard_size`` of 20KB saves even a 2-layer
    model as several shards with ``model.safetensors.index.json``; pass e.g. "1GB" for a single
    ``model.safetensors``. Weights are a deterministic function of ``seed``. ``intermediate``
    replaces the MLPs' width (gpt-oss's MXFP4 packs the experts' inputs in blocks of 32).
    """
    if family not in FAMILIES + NEW_FAMILIES:
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
    if intermediate is not None:
        config.intermediate_size = intermediate

    torch.manual_seed(seed)
    cls = getattr(transformers, CLASSES[family]) if family in CLASSES else AutoModelForCausalLM
    build = cls.from_config if cls is AutoModelForCausalLM else cls._from_config
    model = build(config, attn_implementation="eager")
    _reinit(model, offset_norms=family not in ONE_PLUS_W)
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


def image_prompt(family: str, config: dict) -> dict:
    """A forward call of a multimodal tiny model with one 32 × 32 image (four image tokens, as
    its tower makes them) between text tokens; Gemma 4's also carries four audio tokens."""
    gen = torch.Generator().manual_seed(7)
    text = torch.randint(10, 900, (1, 8), generator=gen)
    image = torch.full((1, 4), IMAGE_TOKEN)
    ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    if family == "gemma3_multimodal":
        return {
            "input_ids": ids,
            "pixel_values": pixels,
            "token_type_ids": (ids == IMAGE_TOKEN).long(),
        }
    if family == "mistral3":
        return {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor([[32, 32]])}
    if family == "llama4":
        return {"input_ids": ids, "pixel_values": pixels}
    if family == "gemma4":
        ids = torch.cat([ids, torch.full((1, 4), AUDIO_TOKEN), text[:, :2]], dim=1)
        kinds = (ids == IMAGE_TOKEN).long() + 3 * (ids == AUDIO_TOKEN).long()
        patch = config["vision_config"]["patch_size"]
        grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1)
        pixels = torch.rand(1, 16, 3 * patch * patch, generator=gen)
        return {"input_ids": ids, "pixel_values": pixels,
                "image_position_ids": grid.reshape(1, -1, 2), "mm_token_type_ids": kinds,
                "input_features": torch.randn(1, 16, 128, generator=gen),
                "input_features_mask": torch.ones(1, 16, dtype=torch.bool)}  # fmt: skip
    if family == "qwen3_5_vl":
        ids = torch.cat([text[:, :3], torch.tensor([[IMAGE_START]]), image,
                         torch.tensor([[IMAGE_END]]), text[:, 3:]], dim=1)  # fmt: skip
        return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 8 * 8, generator=gen),
                "image_grid_thw": torch.tensor([[1, 4, 4]]),
                "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}  # fmt: skip
    if family == "lfm2_vl":
        return {"input_ids": ids, "pixel_values": torch.randn(1, 16, 48, generator=gen),
                "pixel_attention_mask": torch.ones(1, 16, dtype=torch.long),
                "spatial_shapes": torch.tensor([[4, 4]])}  # fmt: skip
    raise ValueError(f"{family} is not a multimodal family")
