"""Peak memory of one QLoRA training step against LoRA on the same model in float32 and bfloat16.

    python bench/qlora_memory.py [--size small|medium] [--threads 2] [--out result.json]

Model as bench/forward.py (medium: hidden 1024, MLP 2816, 4 layers, vocab
32000; batch 4 x seq 128). LoRA r=8, alpha=16 on every linear but lm_head,
float32 adapters, AdamW. Each configuration runs in a process of its own:
the model is built (the 4-bit ones through transformers' BitsAndBytesConfig
from a float32 checkpoint written once), compiled, and one warm-up step is
taken; then the resident-set peak is reset (``/proc/self/clear_refs``) and one
training step (forward, backward, AdamW step) measured. Reported: resident
memory before the step (the model and its optimizer state) and the step's
peak, in MiB, and the peak's ratio to the float32 LoRA step's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "lora fp32": dict(dtype="float32"),
    "lora bf16": dict(dtype="bfloat16"),
    "qlora nf4 (fp32 compute)": dict(dtype="float32", scheme="nf4"),
    "qlora nf4 double-quant (bf16 compute)": dict(dtype="bfloat16", scheme="nf4-dq-bf16"),
}
RULES = 'match type(Linear) where not name("lm_head") apply lora(r=8, alpha=16)'


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(size: str, checkpoint: str, dtype: str, scheme: str | None, threads: int) -> dict:
    import torch
    import transformers
    from forward import build

    import surgeon

    torch.set_num_threads(threads)
    _, config, inputs = build(size)
    kwargs = {"dtype": getattr(torch, dtype)}
    if scheme:
        from surgeon.demos import quantization_config

        kwargs.update(quantization_config=quantization_config(scheme), device_map="cpu")
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, **kwargs)
    compiled = surgeon.compile(model, RULES, example_inputs=inputs).train()
    optimizer = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-4)
    labels = inputs["input_ids"]

    def step():
        loss = compiled(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # the warm-up also makes the training graph and the optimizer state
    before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    step()
    return {"before_step_mib": round(before, 1), "step_peak_mib": round(_rss_mib("VmHWM"), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "medium"), default="medium")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("CHECKPOINT", "DTYPE", "SCHEME", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        checkpoint, dtype, scheme, size = args.child
        print(json.dumps(child(size, checkpoint, dtype, None if scheme == "-" else scheme, args.threads)))
        return

    from forward import build

    results = {}
    with tempfile.TemporaryDirectory(prefix="surgeon-bench-") as folder:
        model, _, _ = build(args.size)
        model.save_pretrained(folder)
        del model
        for name, config in CONFIGS.items():
            command = [sys.executable, __file__, "--threads", str(args.threads), "--child", folder, config["dtype"],
                       config.get("scheme", "-"), args.size]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    floor = results["lora fp32"]["step_peak_mib"]
    print(f"{'configuration':40} {'before step MiB':>16} {'step peak MiB':>14} {'peak / fp32 LoRA':>17}")
    for name, r in results.items():
        r["peak_ratio_to_fp32_lora"] = round(r["step_peak_mib"] / floor, 3)
        print(f"{name:40} {r['before_step_mib']:16.1f} {r['step_peak_mib']:14.1f} {r['peak_ratio_to_fp32_lora']:17.3f}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
