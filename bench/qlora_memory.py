"""Peak memory of one QLoRA training step against LoRA on the same model in float32 and bfloat16.

    python bench/qlora_memory.py [--size small|medium] [--threads 2] [--out result.json]

Model as bench/forward.py (medium: hidden 1024, MLP 2816, 4 layers, vocab
32000; batch 4 x seq 128). LoRA r=8, alpha=16 on every linear but lm_head,
float32 adapters, AdamW. Each configuration runs in a process of its own:
the model is built (the 4-bit ones through transformers' BitsAndBytesConfig
from a float32 checkpoint written once; its float weights copied out of the
checkpoint's memory map), compiled, and one warm-up step is taken; then the resident-set peak is reset (``/proc/self/clear_refs``) and one
training step (forward, backward, AdamW step) measured. Reported, in MiB:
the base model's stored weights, the resident set before the step and the
step's peak; the peak's ratio to the float32 LoRA step's, whole and above the
process's resident set before any weights (torch's own libraries, ~0.2 GiB).
"""

from __future__ import annotations

import argparse
import gc
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
    from forward import SIZES

    import surgeon

    torch.set_num_threads(threads)
    shape = SIZES[size]  # the inputs of forward.build, without building its model here
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    gc.collect()
    baseline = _rss_mib("VmRSS")  # torch, transformers and the inputs, before any model weights
    kwargs = {"dtype": getattr(torch, dtype)}
    if scheme:
        from surgeon.capture.demos import quantization_config

        kwargs.update(quantization_config=quantization_config(scheme), device_map="cpu")
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, **kwargs)
    # transformers leaves unquantized weights memory-mapped from the checkpoint (resident only once touched,
    # and counted as file pages): copy them into the process so every configuration is measured alike
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()
    gc.collect()
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
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
    return {"process_baseline_mib": round(baseline, 1), "base_weights_mib": round(stored, 1),
            "before_step_mib": round(before, 1), "step_peak_mib": round(_rss_mib("VmHWM"), 1)}


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
    base = results["lora fp32"]["process_baseline_mib"]
    print(f"{'configuration':40} {'weights':>8} {'before step':>12} {'step peak':>10} {'peak / fp32':>12} {'above baseline':>15}")
    for name, r in results.items():
        r["peak_ratio_to_fp32_lora"] = round(r["step_peak_mib"] / floor, 3)
        r["peak_above_baseline_ratio"] = round((r["step_peak_mib"] - r["process_baseline_mib"]) / (floor - base), 3)
        print(f"{name:40} {r['base_weights_mib']:8.1f} {r['before_step_mib']:12.1f} {r['step_peak_mib']:10.1f} "
              f"{r['peak_ratio_to_fp32_lora']:12.3f} {r['peak_above_baseline_ratio']:15.3f}")
    print("MiB; 'above baseline': the step peak minus the process's resident set before the model, as a ratio to fp32 LoRA's")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
