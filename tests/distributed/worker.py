"""What each process of the distributed tests runs (started by accelerate or torchrun; see test_distributed.py).

    worker.py train OUT STEPS   DDP, then FSDP2, then transformers' Trainer, as the example trains (the same data)
    worker.py crash OUT         rank 1 raises while rank 0 waits in a collective
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "distributed"))
import train as example  # noqa: E402


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "crash":
        rank, _, _ = example.start_processes()
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        torch.distributed.all_reduce(torch.ones(1))  # rank 1 never joins
        return
    steps = int(sys.argv[3])
    model = example.train("ddp", steps, out / "ddp")
    rank = torch.distributed.get_rank()
    save_file({n: p.detach().contiguous() for n, p in model.trainable_parameters()}, str(out / f"ddp-rank{rank}.safetensors"))
    example.train("fsdp", steps, out / "fsdp")
    example.train_with_trainer(steps + 1, out / "trainer")  # Trainer wraps the model in DDP itself
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
