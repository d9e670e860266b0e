"""Train a compiled model on several processes: DDP, FSDP2, or transformers' Trainer.

    torchrun --standalone --nproc_per_node 2 examples/distributed/train.py --engine ddp
    torchrun --standalone --nproc_per_node 2 examples/distributed/train.py --engine fsdp [--bf16]
    torchrun --standalone --nproc_per_node 2 examples/distributed/train.py --engine trainer
    accelerate launch --multi_gpu --num_processes 2 examples/distributed/train.py --engine trainer
    python examples/distributed/train.py --engine single      # the same training in one process

The model is the built-in tiny Llama with LoRA on every projection and, on a float32
base, its output head trained in full. Every step takes one global batch (8 rows,
rounded up to a multiple of N); each of the N processes trains on its N-th
of the rows, so N processes do the work of one process on the whole batch (for ddp
and fsdp: the same weights, up to float rounding). On a machine with GPUs, each
process uses the GPU of its LOCAL_RANK with the NCCL backend; without, the CPU with
gloo (accelerate's --multi_gpu is its torchrun launcher: on a machine without GPUs
it starts CPU processes). Every rank calls save_adapter (FSDP gathers the shards);
rank 0 writes the adapter, in PEFT's format, to OUT/adapter.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch

import surgeon
from surgeon.capture.demos import build_demo

# As examples/rules/tiny-finetune.surgery: LoRA on every projection, the output head trained in full.
LORA = 'match "*.self_attn.{q,k,v,o}_proj", "*.mlp.{gate,up,down}_proj" apply lora(r=16, alpha=32)'
HEAD = 'match "lm_head" train'
TEXT = "surgeon compiles adapters into the graph; torchrun starts one process per device. " * 8


def global_rows(world: int) -> int:
    """8 rows per global batch, or more so that every one of ``world`` processes gets as many."""
    return world * -(-8 // world)


def global_batches(steps: int, rows: int = 8, seq: int = 32, seed: int = 0):
    """The same ``steps`` global batches in every process (character tokens of TEXT)."""
    data = torch.tensor([ord(c) for c in TEXT])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq, (rows,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts])
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def start_processes() -> tuple:
    """Join the process group torchrun or accelerate set up (rank, world size, device); (0, 1, cpu) without one."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # A rank that dies leaves the others waiting in a collective: a timeout turns that into an error.
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def compiled_model(device, bf16: bool = False):
    """The demo Llama with LoRA (float32) and, on a float32 base, its head trained in full.

    FSDP2 reduces one gradient dtype per group, so a bfloat16 base trains LoRA only:
    a bfloat16 copy of the head next to float32 adapters would be refused.
    """
    base = build_demo("llama").to(device, torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(0)  # the same adapter start in every process (DDP also broadcasts rank 0's)
    return surgeon.compile(base, LORA if bf16 else f"{LORA}\n{HEAD}")


def train(engine: str, steps: int, out: Path | None, bf16: bool = False, lr: float = 0.05):
    """Train with ``engine`` ("single", "ddp" or "fsdp"); the compiled model (unwrapped) after ``steps`` steps."""
    rank, world, device = start_processes() if engine != "single" else (0, 1, torch.device("cpu"))
    model = compiled_model(device, bf16)
    model.train()
    runner = model
    if engine == "ddp":
        runner = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from surgeon.compiled.distributed import fully_shard  # torch's, after surgeon's checks

        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))  # one unit: see surgeon/compiled/distributed.py
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step, batch in enumerate(global_batches(steps, global_rows(world))):
        mine = {k: v[rank::world].to(device) for k, v in batch.items()}
        loss = runner(**mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}  loss {loss.item():.4f}  ({engine}, {world} process{'es' if world > 1 else ''})", flush=True)
    if out is not None:
        model.save_adapter(out / "adapter")  # every rank: FSDP gathers the shards; rank 0 writes
    return model


def train_with_trainer(steps: int, out: Path):
    """transformers' Trainer: it wraps the model in DDP itself under torchrun or accelerate."""
    import transformers

    world = int(os.environ.get("WORLD_SIZE", 1))  # the processes torchrun or accelerate started
    rows = global_rows(world)

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = [{k: v[i] for k, v in b.items()} for b in global_batches(steps, rows) for i in range(rows)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = compiled_model(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=rows // world, max_steps=steps, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo", ddp_timeout=60,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"trainer losses {' '.join(f'{x:.4f}' for x in losses)}  ({trainer.args.world_size} processes)", flush=True)
    model.save_adapter(out / "adapter")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["single", "ddp", "fsdp", "trainer"], default="ddp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"))
    parser.add_argument("--bf16", action="store_true", help="a bfloat16 base (the adapters stay float32)")
    args = parser.parse_args()
    if args.engine == "trainer":
        train_with_trainer(args.steps, args.out)
    else:
        train(args.engine, args.steps, args.out, args.bf16)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
