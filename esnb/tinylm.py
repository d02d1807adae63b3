"""The course's own tiny language model: a small Llama-architecture causal LM with a
character-level tokenizer, SFT-trained on Countdown solution traces.

It is deliberately weak: trained briefly, it writes the format perfectly and the arithmetic
only sometimes. The trained weights ship in ``data/tiny/`` in Hugging Face format; retrain with
``python -m esnb.tinylm`` (a few minutes on 2 CPU cores).

``python -m esnb.tinylm --base`` trains the "base" variant shipped in ``data/tiny-base/``: the
same recipe, but half of its traces put the answer after ``Answer:`` instead of in the
``<answer>`` tags the reward asks for, so it knows the arithmetic but often ignores the format,
the kind of start that fine-tuning (ES in notebook 05) has room to improve.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

import torch

from .tasks import countdown as cd

from .paths import TINY_BASE_DIR, TINY_DIR
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# printable ASCII and newline: enough for the compact prompt and traces, and for any prompt to
# tokenize without surprises (other characters become <unk>)
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# the shipped model's recipe (train() defaults); see notebook 04
DEFAULTS = dict(hidden_size=160, layers=4, heads=5, intermediate_size=448, steps=800,
                batch_size=32, lr=3e-3, warmup=50, n_sft=20000, seed=0, eval_every=50,
                n_val=200, target_acc=0.25, tag_rate=1.0)
# the "base" variant (data/tiny-base/, notebook 05's start): the same recipe and all 800 steps,
# but half of the traces answer as "Answer: ..." instead of in <answer> tags
BASE = dict(DEFAULTS, target_acc=None, tag_rate=0.5)


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


def untagged_trace(puzzle: dict) -> str:
    """The same solution with the answer outside the tags the reward asks for:
    ``"44+19=63,63+35=98</think>\nAnswer: (44+19)+35"`` (format 0.1, answer 0)."""
    return ",".join(puzzle.get("steps") or []) + f"</think>\nAnswer: {puzzle['solution']}"


def encode_examples(tokenizer, puzzles: Sequence[dict], tag_rate: float = 1.0,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt completion <eos>`` ids and labels (prompt and padding -100,
    so the loss is on the completion only).

    ``tag_rate``: the share of traces that put the answer in ``<answer>`` tags; the rest use
    :func:`untagged_trace` (drawn with ``seed``). Below 1 this makes a "base" model that knows
    the arithmetic but only sometimes answers in the requested format.
    """
    if not 0.0 <= tag_rate <= 1.0:
        raise ValueError(f"tag_rate must be in [0, 1], got {tag_rate!r}")
    pick = random.Random(seed)
    rows, labels = [], []
    for p in puzzles:
        prompt = tokenizer.encode(cd.compact_prompt(p["numbers"], p["target"]))  # with <bos>
        trace = cd.solution_trace(p) if pick.random() < tag_rate else untagged_trace(p)
        comp = tokenizer.encode(trace, add_special_tokens=False) + [tokenizer.eos_token_id]
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
          target_acc: float | None = DEFAULTS["target_acc"], tag_rate: float = DEFAULTS["tag_rate"],
          model=None, tokenizer=None, progress: bool = True, threads: int | None = 1):
    """SFT on Countdown traces with AdamW and a warmup + cosine schedule.

    Every ``eval_every`` steps the greedy accuracy on ``n_val`` validation puzzles (disjoint
    from the SFT data and from the shipped splits) is logged. With ``target_acc`` set, training
    stops at the first evaluation that reaches it: we want a model that is weak but not
    hopeless. Pass ``model``/``tokenizer`` to continue from a trained model. ``tag_rate`` < 1
    trains the "base" variant (see :func:`encode_examples`); its validation accuracy counts
    untagged answers as wrong, as the reward does.

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
                      intermediate_size, eval_every, n_val, target_acc, tag_rate, model, tokenizer,
                      progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(steps, batch_size, lr, warmup, n_sft, seed, hidden_size, layers, heads,
           intermediate_size, eval_every, n_val, target_acc, tag_rate, model, tokenizer, progress):
    tokenizer = tokenizer or build_tokenizer()
    if model is None:
        model = build_model(len(tokenizer), hidden_size, layers, heads, intermediate_size, seed)
    pool = sft_puzzles(n_sft + n_val, seed=seed)
    val, sft = pool[:n_val], pool[n_val:]
    ids, labels = encode_examples(tokenizer, sft, tag_rate=tag_rate, seed=seed)
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
    from .files import match_umask

    match_umask(out / "model.safetensors")  # safetensors writes it 0600
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


# (low, high) of each numeric option of the command line; None: unbounded on that side
_BOUNDS = dict(hidden_size=(1, 8192), layers=(1, 64), heads=(1, 256), intermediate_size=(1, 32768),
               steps=(1, None), batch_size=(1, 65536), lr=(0.0, 10.0), warmup=(0, None), n_sft=(1, 200_000),
               seed=(0, 2**63 - 1), eval_every=(0, None), n_val=(1, 100_000), target_acc=(0.0, 1.0),
               tag_rate=(0.0, 1.0))


def _check_options(ap, opts: dict, out: str) -> None:
    """Every bad option ends the command with one line, before anything is trained."""
    for k, (low, high) in _BOUNDS.items():
        v = opts[k]
        if v is None:  # target_acc=None: train all steps
            continue
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high) \
                or (k == "lr" and v <= 0):
            span = f"in ({low}, {high}]" if k == "lr" else (f"in [{low}, {high}]" if high is not None else f">= {low}")
            ap.error(f"--{k.replace('_', '-')}: must be {span}, got {v!r}")
    if opts["hidden_size"] % opts["heads"] or (opts["hidden_size"] // opts["heads"]) % 2:
        ap.error(f"--hidden-size: must be divisible by --heads into an even size per head "
                 f"(got {opts['hidden_size']} and {opts['heads']})")
    if opts["warmup"] > opts["steps"]:
        ap.error(f"--warmup: {opts['warmup']} is more than --steps {opts['steps']}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        ap.error(f"--out: {out} is a file, not a folder")
    from .models import writable

    if not writable(path):  # found out now, not after minutes of training
        ap.error(f"--out: {out} cannot be written here")


def main(argv: Sequence[str] | None = None) -> None:
    from ._env import OneLineParser

    ap = OneLineParser(prog="python -m esnb.tinylm",
                       description="Retrain the tiny Countdown LM and write data/tiny/ "
                                   "(or data/tiny-base/ with --base).")
    ap.add_argument("--base", action="store_true",
                    help="train the 'tiny-base' variant (tag_rate 0.5, all steps) into data/tiny-base/")
    for k, v in DEFAULTS.items():
        kind = float if k == "target_acc" else type(v)
        ap.add_argument(f"--{k.replace('_', '-')}", type=kind, default=None,
                        help=f"default {v} ({BASE[k]} with --base)" if BASE[k] != v else f"default {v}")
    ap.add_argument("--out", default=None, help="default data/tiny/ (data/tiny-base/ with --base)")
    args = ap.parse_args(argv)
    recipe = BASE if args.base else DEFAULTS
    opts = {k: recipe[k] if getattr(args, k) is None else getattr(args, k) for k in DEFAULTS}
    out = args.out or str(TINY_BASE_DIR if args.base else TINY_DIR)
    _check_options(ap, opts, out)
    t0 = time.perf_counter()
    model, tok, log = train(**opts)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    meta = {**opts, "parameters": params, "train_seconds": round(seconds, 1),
            "stopped_at_step": log[-1]["step"]}
    try:
        save(model, tok, log, out, meta)
    except OSError as e:
        ap.exit(1, f"{ap.prog}: error: --out: cannot write {out} ({e.strerror or e})\n")
    accs = [r["val_accuracy"] for r in log if "val_accuracy" in r]
    last = f"last val accuracy {accs[-1]:.2f}" if accs else "no validation (--eval-every 0)"
    print(f"{params:,} parameters, {log[-1]['step']} steps in {seconds:.0f} s; {last}; saved to {out}")


if __name__ == "__main__":
    main()
