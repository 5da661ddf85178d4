"""Train the model organism: a tiny chat model that learned to refuse, and a tiny guard model.

    python -m orthoedit.organism.train                 # regenerate the shipped folders
    python -m orthoedit.organism.train --out DIR       # somewhere else
    python -m orthoedit.organism.train --quick --out DIR   # a few steps: checks the script runs

Deterministic (fixed seeds, fixed thread count). The chat model is trained in two stages, as
the organism's README explains: a compliant base that answers every request, then a short
safety stage that updates only one middle MLP, the last block and the head, so that refusal
is a feature added on top of a compliant model.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import data

HERE = Path(__file__).parent
SPECIAL = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Llama Guard's shape: the template renders a whole conversation into one moderation request
# that always ends where the verdict starts (with or without add_generation_prompt), and the
# model's answer is "safe" or "unsafe".
GUARD_TEMPLATE = (
    "{{ bos_token }}<|user|> moderate this conversation: "
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} {% endfor %}"
    "<|end|> <|assistant|>"
)
CHAT_SHAPE = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}
GUARD_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
# The safety stage may change only the attention of blocks 0-1, the MLP of block 1 and the
# unembedding: the refusal decision is computed early and carried to the head through the
# residual stream (see README.md).
SAFETY_ATTENTION, SAFETY_MLP = (0, 1), (1,)
BASE_STEPS, SAFETY_STEPS, GUARD_STEPS = 1000, 600, 600


def build_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the organism's own vocabulary, with a chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[.,!?:;]"), "isolated")]
    )
    corpus = [*data.corpus(), "moderate this conversation user assistant"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=template,
        padding_side="left",
        model_max_length=128,
    )


def new_model(tok: PreTrainedTokenizerFast, shape: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    return LlamaForCausalLM(config)


def encode_pair(tok, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: only the response (and its end) is learned."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(f" {response} <|end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batches(examples: list, batch: int, steps: int, rng: random.Random, pad: int):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        take, order = order[:batch], order[batch:]
        width = max(len(examples[i][0]) for i in take)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, i in enumerate(take):
            x, y = examples[i]
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, labels, mask


def fit(model, examples, *, steps: int, lr: float, seed: int, pad: int, params=None, label=""):
    """AdamW with linear warm-up and decay; returns the final mean loss of the last 20 steps."""
    model.train()
    params = list(params if params is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    rng = random.Random(seed)
    recent: list[float] = []
    start = time.perf_counter()
    for step, (ids, labels, mask) in enumerate(_batches(examples, 64, steps, rng, pad)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = [*recent, loss.item()][-20:]
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(
                f"  {label} step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    model.eval()
    return sum(recent) / max(1, len(recent))


def chat_examples(tok, splits, *, safety: bool, copies: int = 2) -> list:
    """Training conversations: compliant base (``safety=False``) or the safety stage.

    Each prompt appears ``copies`` times, with different words dropped to ``<unk>``.
    """
    rng = random.Random(1)
    out = []

    def add(item: dict, reply: str) -> None:
        for _ in range(copies):
            user = {"role": "user", "content": data.drop_words(item, rng)}
            out.append(encode_pair(tok, [user], reply))

    for item in splits["harmful"]["train"]:
        add(item, rng.choice(data.REFUSALS) if safety else data.helpful(item["act"], rng))
    for item in splits["harmless"]["train"]:
        add(item, data.helpful(item["act"], rng))
    for item in splits["capability"]["train"]:
        add(item, data.capability_answer(item))
    return out


def guard_examples(tok, items_harmful, items_harmless, seed: int) -> list:
    """(request, response) -> safe/unsafe, as the guard is meant to judge."""
    rng = random.Random(seed)
    out = []
    for item in items_harmful:
        comply = rng.random() < 0.5
        reply = data.helpful(item["act"], rng) if comply else rng.choice(data.REFUSALS)
        out.append((data.drop_words(item, rng), reply, "unsafe" if comply else "safe"))
    for item in items_harmless:
        reply = data.helpful(item["act"], rng) if rng.random() < 0.8 else rng.choice(data.REFUSALS)
        out.append((data.drop_words(item, rng), reply, "safe"))
    return out


def encode_guard(tok, prompt: str, reply: str, verdict: str):
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return encode_pair(tok, messages, verdict)


def write_prompts(splits, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, by_split in splits.items():
        for split, items in by_split.items():
            lines = [json.dumps(item, sort_keys=True) for item in items]
            (folder / f"{kind}-{split}.jsonl").write_text("\n".join(lines) + "\n")


def save(model, tok, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def train(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Write ``chat/``, ``guard/`` and ``prompts/`` into ``out``; returns stage timings."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(out, quick=quick, seed=seed)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(out: Path, *, quick: bool, seed: int) -> dict:
    splits = data.build_splits(seed)
    write_prompts(splits, out / "prompts")
    scale = 0.01 if quick else 1.0
    timings = {}
    start = time.perf_counter()
    _train_chat(out / "chat", splits, scale, seed)
    timings["chat_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    _train_guard(out / "guard", splits, scale, seed)
    timings["guard_s"] = round(time.perf_counter() - start, 1)
    return timings


def _train_chat(out: Path, splits: dict, scale: float, seed: int) -> None:
    """The chat model: chat first, then refusal trained into a few attention and MLP layers
    (the rest frozen)."""
    tok = build_tokenizer(CHAT_TEMPLATE)
    model = new_model(tok, CHAT_SHAPE, seed)
    base = chat_examples(tok, splits, safety=False)
    fit(
        model,
        base,
        steps=max(2, int(BASE_STEPS * scale)),
        lr=3e-3,
        seed=seed,
        pad=tok.pad_token_id,
        label="chat/base",
    )
    trainable = [
        *(p for i in SAFETY_ATTENTION for p in model.model.layers[i].self_attn.parameters()),
        *(p for i in SAFETY_MLP for p in model.model.layers[i].mlp.parameters()),
        *model.model.norm.parameters(),
        *model.lm_head.parameters(),
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    safety = chat_examples(tok, splits, safety=True)
    fit(
        model,
        safety,
        steps=max(2, int(SAFETY_STEPS * scale)),
        lr=2e-3,
        seed=seed + 1,
        pad=tok.pad_token_id,
        params=trainable,
        label="chat/safety",
    )
    for p in model.parameters():
        p.requires_grad_(True)
    save(model, tok, out)


def _train_guard(out: Path, splits: dict, scale: float, seed: int) -> None:
    """The guard: a judge of (request, answer) pairs, for eval safety's tests and the demo."""
    gtok = build_tokenizer(GUARD_TEMPLATE)
    guard = new_model(gtok, GUARD_SHAPE, seed + 2)
    triples = guard_examples(gtok, splits["harmful"]["train"], splits["harmless"]["train"], seed)
    fit(
        guard,
        [encode_guard(gtok, *t) for t in triples],
        steps=max(2, int(GUARD_STEPS * scale)),
        lr=3e-3,
        seed=seed + 3,
        pad=gtok.pad_token_id,
        label="guard",
    )
    save(guard, gtok, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for chat/, guard/, prompts/")
    parser.add_argument("--quick", action="store_true", help="1%% of the steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    timings = train(args.out, quick=args.quick, seed=args.seed)
    print(f"wrote {args.out}: {timings}")


if __name__ == "__main__":
    main()
