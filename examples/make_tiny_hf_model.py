"""Make the inputs of the ``sdi`` command-line quickstart, locally (nothing downloaded):

    python examples/make_tiny_hf_model.py --out tiny

writes, in a few seconds on a CPU,

- ``tiny/model/``: a tiny looped causal LM from ``transformers`` (``HrmTextForCausalLM``: a low-level
  stack ``L_module`` looped inside a high-level stack ``H_module``, random weights) saved with
  ``save_pretrained``, and its tokenizer (a word-level ``tokenizers`` model built from the corpus,
  saved as a ``PreTrainedTokenizerFast``);
- ``tiny/checkpoint-2/`` and ``tiny/checkpoint-4/``: Trainer-style checkpoint folders after 2 and 4
  AdamW steps (``model.safetensors`` + ``config.json`` from ``save_pretrained``, and a
  ``trainer_state.json`` whose ``log_history`` holds the learning rate, which ``sdi`` reads as
  each checkpoint's weight ``eta``);
- ``tiny/train.jsonl`` (24 sentences) and ``tiny/query.jsonl`` (4): one ``{"text": ...}`` per line.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import HrmTextConfig, HrmTextForCausalLM, PreTrainedTokenizerFast, TrainerState

from sdi.lm_loss import causal_lm_loss

SUBJECTS = ["the cat", "a dog", "the bird", "my friend"]
VERBS = ["sees", "likes", "follows"]
OBJECTS = ["the ball", "a tree"]
QUERIES = ["the cat likes a tree", "a dog sees the ball", "my friend follows the bird", "a bird"]
SPECIAL = ["[PAD]", "[UNK]"]
LR, STEPS, SAVE = 3e-3, 4, (2, 4)


def corpus() -> list[str]:
    """24 train sentences: every subject, verb and object."""
    return [" ".join(p) for p in itertools.product(SUBJECTS, VERBS, OBJECTS)]


def make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts`` (unknown words -> [UNK], pad [PAD])."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")


def make_model(vocab_size: int, pad_id: int, seed: int = 0) -> HrmTextForCausalLM:
    config = HrmTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,  # layers per stack
        num_attention_heads=2,
        head_dim=16,
        max_position_embeddings=16,
        H_cycles=2,  # H_module runs twice ...
        L_cycles=2,
        L_bp_cycles=[2, 2],  # ... and L_module twice per H cycle, all with gradients: 4 uses
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    return HrmTextForCausalLM(config)


def batch_of(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def save_checkpoint(folder: Path, model, step: int, history: list[dict]) -> None:
    """What ``transformers.Trainer`` writes at a save step: weights, config, trainer state."""
    model.save_pretrained(folder)
    state = TrainerState(global_step=step, max_steps=STEPS, logging_steps=1, log_history=history)
    state.save_to_json(str(folder / "trainer_state.json"))


def make(out: Path) -> dict[str, Path]:
    """Write everything under ``out``; returns the paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()  # a bar per saved folder says nothing here
    texts = corpus()
    tokenizer = make_tokenizer(texts + QUERIES)
    model = make_model(len(tokenizer), tokenizer.pad_token_id)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    for name, rows in (("train", texts), ("query", QUERIES)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (STEPS + 1))
    batch = batch_of(tokenizer, texts)
    history: list[dict] = []
    model.train()
    for step in range(1, STEPS + 1):
        loss = causal_lm_loss(model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(
            {"loss": loss.item(), "learning_rate": schedule.get_last_lr()[0], "step": step}
        )
        if step in SAVE:
            save_checkpoint(out / f"checkpoint-{step}", model, step, history)
    names = {"model": "model", "train": "train.jsonl", "query": "query.jsonl"}
    return {k: out / v for k, v in names.items()} | {
        f"checkpoint-{s}": out / f"checkpoint-{s}" for s in SAVE
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tiny"), help="folder to write")
    args = parser.parse_args()
    for name, path in make(args.out).items():
        print(f"{name:>13}: {path}")


if __name__ == "__main__":
    main()
