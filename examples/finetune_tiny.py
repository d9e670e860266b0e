"""Fine-tune the built-in tiny Llama with a rules file, on CPU, then save, fold, reload and generate.

    python examples/finetune_tiny.py [--steps 300] [--out runs/tiny]

The task: continue a short text, character by character (a character-level
"tokenizer", so nothing is downloaded). The base model has random weights;
LoRA on every projection plus a trained head learn the text in a few hundred
steps. Then:
  - the adapter is saved in PEFT's format (OUT/adapter),
  - the adapters are folded and a merged checkpoint written (OUT/merged),
  - transformers reloads the merged checkpoint and generates the text back.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import surgeon

TEXT = (
    "surgeon compiles adapters into the graph. rules say which modules change; "
    "the plan shows it before any weight moves; fold gives back the base graph. "
)
RULES = Path(__file__).parent / "rules" / "tiny-finetune.surgery"


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]  # code points < 1000: the demo's vocabulary


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def batches(steps: int, batch: int = 8, seq: int = 96, seed: int = 0):
    data = torch.tensor(encode(TEXT * 4))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(TEXT), (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts])
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="output folder (default: runs/tiny)")
    args = parser.parse_args()
    torch.manual_seed(0)

    started = time.perf_counter()
    model = surgeon.compile("demo:llama", RULES)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=3e-3)
    model.train()
    for step, batch in enumerate(batches(args.steps)):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f} s)")

    model.eval()
    model.save_adapter(args.out / "adapter")
    model.save_pretrained(args.out / "merged")  # folded: the base architecture, merged weights
    model.export(args.out / "model.pt2")  # the folded program, dynamic batch and sequence
    print(f"saved {args.out / 'adapter'} (PEFT format), {args.out / 'merged'} (merged checkpoint), {args.out / 'model.pt2'}")

    merged = transformers.AutoModelForCausalLM.from_pretrained(args.out / "merged").eval()
    prompt = TEXT[:24]
    ids = torch.tensor([encode(prompt)])
    out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False)
    print(f"prompt    : {prompt!r}")
    print(f"generated : {decode(out[0, len(prompt):].tolist())!r}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
