#!/usr/bin/env python
"""Train tc's built-in model: a small GPT-2 (LayerNorm, GELU MLP, learned positions, sequential blocks).

Rerunnable end to end, offline, on CPU or GPU:

    apt-get install -y bible-kjv-text        # Debian's public-domain King James Bible (the `bible` program)
    python scripts/train_builtin_model.py --out tccli/builtin/model

Text: the King James Bible (public domain; dumped with `bible -f Gen1:1-Rev22:21`, or read from
--kjv FILE) plus a generated portion where numbers matter (spans of years, counting, ordered lists).
Tokenizer: byte-level BPE trained here, with GPT-2's pre-tokenisation except that digits are cut into
pairs, so " 1735" -> " 17" + "35" as in GPT-2, and every "00".."99" and " 00".." 99" is one token.

The run is deterministic for a given --seed and thread count. It checkpoints to build/builtin-train-checkpoint.pt
(--resume continues from it) and writes the model card OUT/README.md with the final figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tccli.evaluation import greater_than  # noqa: E402

BOS = "<|endoftext|>"

# Digits are cut into pairs (" ?\p{N}{1,2}"), the rest is GPT-2's pre-tokenisation pattern.
PRETOKENIZE_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,2}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

NOUNS = [
    "war",
    "siege",
    "reign",
    "famine",
    "drought",
    "voyage",
    "journey",
    "campaign",
    "plague",
    "rebellion",
    "dynasty",
    "kingdom",
    "empire",
    "treaty",
    "truce",
    "conflict",
    "struggle",
    "exile",
    "captivity",
    "pilgrimage",
    "council",
    "trial",
    "flood",
    "building of the temple",
    "expedition",
    "occupation",
    "revival",
    "settlement",
    "mission",
    "crusade",
    "alliance",
    "dispute",
    "feud",
    "harvest",
    "peace",
]
PEOPLE = [
    "He",
    "She",
    "The king",
    "The queen",
    "The prophet",
    "The poet",
    "The bishop",
    "The merchant",
    "My grandfather",
    "Her mother",
    "The general",
    "The painter",
    "The scholar",
    "The captain",
]
ITEMS = [
    "bread",
    "wine",
    "oil",
    "salt",
    "wool",
    "linen",
    "silver",
    "gold",
    "wheat",
    "barley",
    "figs",
    "olives",
    "honey",
    "sheep",
    "goats",
    "oxen",
    "cedar",
    "stone",
    "iron",
    "brass",
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]


# ---------------------------------------------------------------------------------------------- text
def kjv_documents(kjv_file: str | None) -> list[str]:
    """One document per chapter of the King James Bible, verse references removed."""
    if kjv_file:
        raw = Path(kjv_file).read_text(encoding="utf-8", errors="replace")
    else:
        try:
            raw = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            sys.exit(f"cannot read the King James Bible ({exc}); apt-get install bible-kjv-text or pass --kjv FILE")
    chapters: dict[str, list[str]] = {}
    verse = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")
    for line in raw.splitlines():
        m = verse.match(line.strip())
        if m:
            chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4).strip())
    return [" ".join(v) for v in chapters.values()]


def _year_span(rng: random.Random) -> str:
    century = rng.choice([17, 17, 17] + list(range(10, 20)))
    start = rng.randint(0, 98)
    if rng.random() < 0.85:  # a span within one century: the end's last two digits are larger
        end_c, end = century, rng.randint(start + 1, 99)
    else:
        end_c, end = century + 1, rng.randint(0, 99)
    a, b = f"{century}{start:02d}", f"{end_c}{end:02d}"
    noun = rng.choice(NOUNS)
    person = rng.choice(PEOPLE)
    templates = [
        f"The {noun} lasted from the year {a} to the year {b}.",
        f"The {noun} lasted from {a} to {b}.",
        f"The {noun} began in the year {a} and ended in the year {b}.",
        f"The {noun} began in {a} and ended in {b}.",
        f"From the year {a} to the year {b} the {noun} went on.",
        f"The {noun} ran from {a} until {b}.",
        f"{person} was born in the year {a} and died in the year {b}.",
        f"{person} lived from {a} to {b}.",
        f"Between {a} and {b} the {noun} continued.",
        f"The {noun} of {a} was followed by another in {b}.",
    ]
    return rng.choice(templates)


def _counting(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        start = rng.randint(0, 12)
        n = rng.randint(3, min(9, 21 - start))
        words = NUMBER_WORDS[start : start + n]
        return (", ".join(words) + ".").capitalize()
    if kind < 0.7:
        start = rng.randint(0, 95)
        n = rng.randint(3, min(10, 100 - start))
        return "Count: " + ", ".join(str(start + i) for i in range(n)) + "."
    start = rng.randint(1, 90)
    n = rng.randint(2, 5)
    return " ".join(f"Chapter {start + i}." for i in range(n))


def _ordered_list(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        values = sorted(rng.sample(range(100), rng.randint(3, 8)))
        return "In order: " + ", ".join(str(v) for v in values) + "."
    if kind < 0.7:
        items = rng.sample(ITEMS, rng.randint(2, 6))
        return " ".join(f"{i + 1}. {item}" for i, item in enumerate(items))
    items = rng.sample(ITEMS, rng.randint(2, 5))
    return " ".join(f"The {ORDINALS[i]} was {item}." for i, item in enumerate(items))


def generated_documents(n_docs: int, seed: int) -> list[str]:
    """Documents of 3-8 sentences: spans of years (60%), counting (20%), ordered lists (20%)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            r = rng.random()
            sentences.append(_year_span(rng) if r < 0.6 else _counting(rng) if r < 0.8 else _ordered_list(rng))
        docs.append(" ".join(sentences))
    return docs


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(documents: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every two-digit number, with and without a leading space, is frequent enough to become a token.
    numbers = " ".join(f"{v:02d} {v:02d}" for v in range(100))
    tok.train_from_iterator(documents + [numbers] * 200, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS)
    for v in range(100):
        for text in (f"{v:02d}", f" {v:02d}"):
            if len(fast.encode(text, add_special_tokens=False)) != 1:
                sys.exit(f"tokenizer check failed: {text!r} is not one token")
    pieces = fast.convert_ids_to_tokens(
        fast.encode("The war lasted from the year 1735 to the year 17", add_special_tokens=False)
    )
    print("prompt tokens:", pieces, file=sys.stderr)
    return fast


def pack(documents: list[str], tokenizer, context: int) -> torch.Tensor:
    """BOS before each document, one stream, cut into rows of ``context`` (the tail dropped)."""
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.append(bos)
        stream.extend(ids)
    n_rows = len(stream) // context
    return torch.tensor(stream[: n_rows * context], dtype=torch.long).view(n_rows, context)


# -------------------------------------------------------------------------------------------- train
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "tccli" / "builtin" / "model"))
    p.add_argument("--kjv", default=None, help="a text dump of the KJV (default: run `bible`)")
    p.add_argument("--generated-docs", type=int, default=30000)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (0: torch's default; 1 was fastest on a busy 2-core machine)",
    )
    p.add_argument(
        "--checkpoint",
        default=str(REPO / "build" / "builtin-train-checkpoint.pt"),
        help="where the resumable training state goes (outside the package)",
    )
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(args.checkpoint)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    kjv = kjv_documents(args.kjv)
    generated = generated_documents(args.generated_docs, args.seed)
    rng = random.Random(args.seed)
    kjv_order = list(range(len(kjv)))
    rng.shuffle(kjv_order)
    n_kjv_held = max(1, len(kjv) // 50)
    n_gen_held = max(1, len(generated) // 50)
    held_kjv = [kjv[i] for i in kjv_order[:n_kjv_held]]
    train_docs = [kjv[i] for i in kjv_order[n_kjv_held:]] + generated[n_gen_held:]
    held_gen = generated[:n_gen_held]
    rng.shuffle(train_docs)

    tokenizer = train_tokenizer(train_docs, args.vocab)
    train_rows = pack(train_docs, tokenizer, args.context)
    held_rows = {"kjv": pack(held_kjv, tokenizer, args.context), "generated": pack(held_gen, tokenizer, args.context)}
    print(
        f"train: {train_rows.numel():,} tokens ({len(kjv) - n_kjv_held} KJV chapters, "
        f"{len(generated) - n_gen_held} generated docs); held out: "
        + ", ".join(f"{k} {v.numel():,}" for k, v in held_rows.items()),
        file=sys.stderr,
    )

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.n_positions,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        n_inner=4 * args.d_model,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    step = 0
    gen = torch.Generator().manual_seed(args.seed)
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        gen.set_state(state["generator"])
        print(f"resumed at step {step}", file=sys.stderr)

    def held_out_loss() -> dict[str, float]:
        model.eval()
        losses = {}
        with torch.no_grad():
            for name, rows in held_rows.items():
                total, count = 0.0, 0
                for i in range(0, len(rows), 64):
                    batch = rows[i : i + 64].to(device)
                    out_ = model(batch, labels=batch)
                    total += float(out_.loss) * batch.shape[0]
                    count += batch.shape[0]
                losses[name] = total / max(1, count)
        model.train()
        return losses

    def prob_diff() -> float:
        model.eval()
        result = greater_than.probability_difference_of_logits_fn(
            lambda t: model(t.to(device)).logits.float().cpu(), tokenizer, tokenizer.bos_token_id
        )
        model.train()
        return result.mean

    model.train()
    started = time.time()
    history = []
    while step < args.steps:
        idx = torch.randint(0, len(train_rows), (args.batch,), generator=gen)
        batch = train_rows[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            print(
                f"step {step}/{args.steps} loss {loss.item():.3f} lr {lr_at(step):.2e} "
                f"{(time.time() - started) / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            losses, pd = held_out_loss(), prob_diff()
            history.append({"step": step, **{f"held_out_loss_{k}": v for k, v in losses.items()}, "prob_diff": pd})
            print(
                f"EVAL step {step}: held-out loss {losses}, greater-than prob diff {pd:.3f}",
                file=sys.stderr,
                flush=True,
            )
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "generator": gen.get_state(),
                },
                tmp,
            )
            os.replace(tmp, ckpt_path)
            save(model, tokenizer, out)

    final = (
        history[-1]
        if history
        else {"step": step, **{f"held_out_loss_{k}": v for k, v in held_out_loss().items()}, "prob_diff": prob_diff()}
    )
    save(model, tokenizer, out)
    write_card(
        out,
        args,
        config,
        n_params,
        train_rows.numel(),
        {k: v.numel() for k, v in held_rows.items()},
        final,
        history,
        time.time() - started,
        device,
    )
    print(json.dumps(final), flush=True)


def save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_card(
    out: Path,
    args,
    config,
    n_params: int,
    n_train: int,
    n_held: dict,
    final: dict,
    history: list,
    seconds: float,
    device,
) -> None:
    rows = "\n".join(
        f"| {h['step']} | {h['held_out_loss_kjv']:.3f} | {h['held_out_loss_generated']:.3f} | {h['prob_diff']:.3f} |"
        for h in history
    )
    weights = out / "model.safetensors"
    size_mb = weights.stat().st_size / 1e6 if weights.exists() else float("nan")
    card = f"""# tc built-in model

A small language model with GPT-2's architecture (`GPT2LMHeadModel`: LayerNorm, GELU (`gelu_new`) MLP,
learned positional embeddings, sequential attention-then-MLP blocks, tied embedding/unembedding), shipped
inside `tccli` so that every `tc` command works offline out of the box (`--model builtin`, the default).
Trained from a random initialisation by `scripts/train_builtin_model.py` (rerun it to reproduce;
the defaults are this model's settings, `python scripts/train_builtin_model.py` writes it again).

## Size
{config.n_layer} layers, d_model {config.n_embd}, {config.n_head} heads (d_head {config.n_embd // config.n_head}),
d_mlp {config.n_inner}, vocabulary {config.vocab_size}, {config.n_positions} positions;
{n_params:,} parameters, stored as float32 safetensors ({size_mb:.1f} MB).

## Training data
- **The King James Bible** (1611 translation; public domain), from Debian's `bible-kjv-text` package
  (dumped with `bible -f Gen1:1-Rev22:21`; verse references removed; one document per chapter). The
  package's own copyright file: "The copyright for the King James Version text of the Bible is expired";
  its retrieval software is GPL-2+, but no code of it is used here, only the text.
- **Generated text** (written by the training script, seed {args.seed}; {args.generated_docs} documents of
  3-8 sentences): spans of years in 10 templates and 35 nouns, e.g. "The siege lasted from the year 1735
  to the year 1789." (85% within one century with a larger end year, 15% into the next century;
  centuries 10-19, 17 three times as often), counting in words and digits, "Chapter N." runs, sorted
  number lists and numbered lists of items. The exact greater-than prompt template ("The war lasted
  from the year 17YY to the year 17") is one of the templates, so the task is in-distribution for this
  model: it was taught greater-than, GPT-2 learnt it from the web.
- 2% of the KJV chapters and 2% of the generated documents are held out. Train: {n_train:,} tokens;
  held out: {", ".join(f"{k} {v:,}" for k, v in n_held.items())} tokens.

## Tokenizer
Byte-level BPE (HuggingFace `tokenizers`), {config.vocab_size} tokens, trained on the training text, one
special token `<|endoftext|>` (BOS = EOS). Pre-tokenisation is GPT-2's regex except that digits are cut
into pairs (`" ?\\p{{N}}{{1,2}}"`), so " 1735" becomes " 17" + "35" as in GPT-2, and every two-digit
number "00".."99" and " 00".." 99" is a single token (checked by the script).

## Hyperparameters
Context {args.context}, batch {args.batch} rows ({args.batch * args.context} tokens), {args.steps} steps
({args.steps * args.batch * args.context:,} tokens seen), AdamW (betas 0.9/0.95, weight decay {args.weight_decay}
on matrices), peak learning rate {args.lr}, {args.warmup} warm-up steps then cosine decay to 10%,
gradient clipping 1.0, no dropout, seed {args.seed}. Trained on {device} in {seconds / 60:.1f} minutes.

## Results
Final held-out cross-entropy (nats/token): KJV {final["held_out_loss_kjv"]:.3f}, generated
{final["held_out_loss_generated"]:.3f}. Greater-than probability difference on the 100 prompts of
`tccli.evaluation.greater_than` (YY 02..98): **{final["prob_diff"]:.3f}** (bar 0.6; GPT-2 small 0.883).

| step | held-out loss KJV | held-out loss generated | greater-than prob. diff. |
|---:|---:|---:|---:|
{rows}
"""
    (out / "README.md").write_text(card, encoding="utf-8")


if __name__ == "__main__":
    main()
