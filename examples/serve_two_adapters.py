"""Serve two adapters from one compiled graph: each request of a batch runs with its own adapter.

    python examples/serve_two_adapters.py [--out runs/serve]

1. Two LoRA adapters are made the way a fine-tuning job would (a few steps
   each on its own toy task: "count up" and "count down" over token ids) and
   saved in PEFT's format: OUT/adapters/up/ and OUT/adapters/down/.
2. The server compiles the base model once with both adapters loaded
   (``surgeon.compile(model, adapter=OUT/adapters)``) and answers a mixed batch
   in one forward: ``adapter_ids`` holds each row's adapter (its index in
   ``compiled.adapter_names``; -1 for the base model).
3. It checks each row against running that request alone with its adapter
   active (``set_active``), and switches adapters without a new graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import surgeon

RULES = """\
adapter "up" {
  match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)
}
adapter "down" {
  match "*.self_attn.{q,v}_proj", "*.mlp.down_proj" apply lora(r=4, alpha=8)
}
"""


def sequences(direction: int, batch: int = 8, length: int = 12, seed: int = 0) -> torch.Tensor:
    start = torch.randint(100, 900, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return start + direction * torch.arange(length)


def train_adapters(folder: Path, steps: int) -> None:
    """Each adapter learns its own task, training only while active."""
    compiled = surgeon.compile("demo:llama", RULES)
    compiled.train()
    for name, direction in (("up", 1), ("down", -1)):
        compiled.set_active(name)  # the other adapter neither acts nor trains
        optimizer = torch.optim.AdamW([p for _, p in compiled.trainable_parameters()], lr=3e-2)
        for step in range(steps):
            ids = sequences(direction, seed=step % 2)  # two fixed batches: quick to learn
            loss = compiled(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"trained {name!r}: loss {loss.item():.3f} after {steps} steps")
    compiled.save_adapter(folder)
    print(f"saved adapters to {folder}/ (PEFT format: {', '.join(compiled.adapter_names)})")


def serve(folder: Path) -> None:
    server = surgeon.compile("demo:llama", adapter=folder).eval()
    names = server.adapter_names
    requests = [("up", 300), ("down", 600), (None, 450), ("down", 200), ("up", 700)]
    prompts = torch.stack([torch.tensor([s, s + (1 if a == "up" else -1), s + (2 if a == "up" else -2)]) for a, s in requests])
    ids = torch.tensor([names.index(a) if a else -1 for a, _ in requests])
    with torch.no_grad():
        batch = server(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_ids=ids).logits
        print(f"one forward for {len(requests)} requests over adapters {names} (ids {ids.tolist()}):")
        for row, (adapter, _) in enumerate(requests):
            server.set_active([adapter] if adapter else [])
            alone = server(input_ids=prompts[row : row + 1], attention_mask=torch.ones_like(prompts[row : row + 1])).logits
            assert torch.allclose(batch[row], alone[0], atol=1e-5), "a routed row differs from the request run alone"
            print(f"  {str(adapter or 'base'):>5}: prompt {prompts[row].tolist()} -> next token {int(batch[row, -1].argmax())}")
    server.set_active(list(names))
    print(f"every row equals its request run alone; graphs captured: {len(server._graphs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/serve"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_adapters(args.out / "adapters", args.steps)
    serve(args.out / "adapters")


if __name__ == "__main__":
    main()
