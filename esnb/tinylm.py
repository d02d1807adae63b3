"""The course's own tiny language model: a small Llama-architecture causal LM with a
character-level tokenizer, SFT-trained on Countdown solution traces.

It is deliberately weak: trained briefly, it writes the format perfectly and the arithmetic
only sometimes, so ES (notebook 05) and GRPO (notebook 06) have room to improve it. The
trained weights ship in ``data/tiny/`` in Hugging Face format; retrain with
``python -m esnb.tinylm`` (a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .tasks import countdown as cd

TINY_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# printable ASCII and newline: enough for the compact prompt and traces, and for any prompt to
# tokenize without surprises (other characters become <unk>)
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# the shipped model's recipe (train() defaults); see notebook 04
DEFAULTS = dict(hidden_size=160, layers=4, heads=5, intermediate_size=448, steps=800,
                batch_size=32, lr=3e-3, warmup=50, n_sft=20000, seed=0, eval_every=50,
                n_val=200, target_acc=0.25)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: one token per character, the four tags as
    single tokens, ``<bos>`` prepended, left padding."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + list(TAGS) + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=256)


def build_model(vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                intermediate_size: int = 384, seed: int = 0):
    """A small ``LlamaForCausalLM`` (tied embeddings), randomly initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model


def sft_puzzles(n: int, seed: int = 0) -> list[dict]:
    """Fresh training puzzles for SFT, disjoint from the shipped train and test splits."""
    train, test = cd.load_split()
    exclude = {cd.puzzle_key(p) for p in train + test}
    return cd.generate_puzzles(n, seed=10_000 + seed, exclude=exclude, prefix="sft",
                               with_context=False)


def encode_examples(tokenizer, puzzles: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt completion <eos>`` ids and labels (prompt and padding -100,
    so the loss is on the completion only)."""
    rows, labels = [], []
    for p in puzzles:
        prompt = tokenizer.encode(cd.compact_prompt(p["numbers"], p["target"]))  # with <bos>
        comp = tokenizer.encode(cd.solution_trace(p), add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt + comp)
        labels.append([-100] * len(prompt) + comp)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


def _val_accuracy(model, tokenizer, puzzles) -> float:
    from .generation import evaluate

    return evaluate(model, tokenizer, cd.CountdownTask("compact"), puzzles,
                    batch_size=100, progress=False)["accuracy"]


def train(steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
          lr: float = DEFAULTS["lr"], warmup: int = DEFAULTS["warmup"],
          n_sft: int = DEFAULTS["n_sft"], seed: int = DEFAULTS["seed"],
          hidden_size: int = DEFAULTS["hidden_size"], layers: int = DEFAULTS["layers"],
          heads: int = DEFAULTS["heads"], intermediate_size: int = DEFAULTS["intermediate_size"],
          eval_every: int = DEFAULTS["eval_every"], n_val: int = DEFAULTS["n_val"],
          target_acc: float | None = DEFAULTS["target_acc"], model=None, tokenizer=None,
          progress: bool = True, threads: int | None = 1):
    """SFT on Countdown traces with AdamW and a warmup + cosine schedule.

    Every ``eval_every`` steps the greedy accuracy on ``n_val`` validation puzzles (disjoint
    from the SFT data and from the shipped splits) is logged. With ``target_acc`` set, training
    stops at the first evaluation that reaches it: we want a model that is weak but not
    hopeless. Pass ``model``/``tokenizer`` to continue from a trained model.

    ``threads``: CPU threads while training (restored afterwards); one is the fastest choice
    for a model this small on a shared 2-core machine.

    Returns ``(model, tokenizer, log)`` where ``log`` is a list of dicts (step, loss, lr,
    val_accuracy where measured, seconds).
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(steps, batch_size, lr, warmup, n_sft, seed, hidden_size, layers, heads,
                      intermediate_size, eval_every, n_val, target_acc, model, tokenizer, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(steps, batch_size, lr, warmup, n_sft, seed, hidden_size, layers, heads,
           intermediate_size, eval_every, n_val, target_acc, model, tokenizer, progress):
    tokenizer = tokenizer or build_tokenizer()
    if model is None:
        model = build_model(len(tokenizer), hidden_size, layers, heads, intermediate_size, seed)
    pool = sft_puzzles(n_sft + n_val, seed=seed)
    val, sft = pool[:n_val], pool[n_val:]
    ids, labels = encode_examples(tokenizer, sft)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="SFT", unit="step")
    log: list[dict] = []
    t0 = time.perf_counter()
    for step in bar:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        x, y = ids[idx], labels[idx]
        width = int((y != -100).nonzero()[:, 1].max()) + 1  # trim shared right padding
        x, y = x[:, :width], y[:, :width]
        loss = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long(), labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = {"step": step + 1, "loss": loss.detach().item(), "lr": lr_at(step),
               "seconds": time.perf_counter() - t0}
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            row["val_accuracy"] = _val_accuracy(model, tokenizer, val)
            if progress:
                bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{row['val_accuracy']:.2f}")
        log.append(row)
        if target_acc is not None and row.get("val_accuracy", -1.0) >= target_acc:
            break
    model.eval()
    return model, tokenizer, log


def save(model, tokenizer, log: list[dict] | None, out_dir: str | Path = TINY_DIR,
         meta: dict | None = None) -> Path:
    """Write the model (safetensors), tokenizer and training log (``training_log.jsonl``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if log is not None:
        with open(out / "training_log.jsonl", "w") as f:
            for row in log:
                f.write(json.dumps(row) + "\n")
    if meta is not None:
        (out / "recipe.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_log(out_dir: str | Path = TINY_DIR):
    """The shipped training log as a pandas DataFrame."""
    import pandas as pd

    return pd.read_json(Path(out_dir) / "training_log.jsonl", lines=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m esnb.tinylm",
                                 description="Retrain the tiny Countdown LM and write data/tiny/.")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--out", default=str(TINY_DIR))
    args = ap.parse_args(argv)
    opts = {k: getattr(args, k) for k in DEFAULTS}
    t0 = time.perf_counter()
    model, tok, log = train(**opts)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    meta = {**opts, "parameters": params, "train_seconds": round(seconds, 1),
            "stopped_at_step": log[-1]["step"]}
    save(model, tok, log, args.out, meta)
    print(f"{params:,} parameters, {log[-1]['step']} steps in {seconds:.0f} s; "
          f"last val accuracy {[r for r in log if 'val_accuracy' in r][-1]['val_accuracy']:.2f}; "
          f"saved to {args.out}")


if __name__ == "__main__":
    main()
