"""surgeon against PEFT on the same model in the same run: one table of ratios, one JSON result.

    python bench/compare_peft.py [--size small|medium] [--repeats 7] [--threads 1] [--compile] [--out FILE]

Model as bench/forward.py (medium: a Llama of hidden 1024, MLP 2816, 4 layers,
16 heads, vocab 32000; batch 4 x seq 128), float32, CPU, torch threads
pinned. LoRA r=8, alpha=16 on every linear but lm_head (PEFT:
``target_modules="all-linear"``), B non-zero. Timed configurations run in turn
within each round after a warm-up (bench/_timing.py), so drift hits all alike;
medians. Rows (the numbers of the benchmark issue):

1. forward, unmerged: surgeon / base model, surgeon / PEFT
2. training step (forward, backward, AdamW): surgeon / floor (every weight
   frozen, backward down to the input embeddings), surgeon / PEFT; eager.
   Rows 1, 2, 3, 5 and 8 give the median of per-round ratios (the two ran
   seconds apart) with its interquartile range (bench/_timing.py)
3. (``--compile``) training step under torch.compile, steady state and
   first step: surgeon / PEFT
4. peak resident memory of a training step (after one warm-up step, the
   peak reset first), separate processes: surgeon / PEFT
5. forward after fold: surgeon's folded graph / base model (spread reported)
6. fold time: surgeon ``fold()`` / PEFT ``merge_and_unload()``
7. set-up time: ``surgeon.compile`` / ``get_peft_model``: the first capture
   in this process, the same architecture again in this process (surgeon's
   in-memory cache), and in a fresh process (imports excluded) cold (capture
   cache off) and warm (the capture cache: surgeon/capture/cache.py); set-up
   plus the first training step too, as a warm compile exports its graph at
   that first call
8. routed forward (adapters r=8 and r=16 on q, v; a mixed batch): surgeon
   routed / surgeon single adapter
9. planning a 7B-shaped Llama without weights (bench/plan_7b.py), cold and
   warm: seconds, MiB
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import round_ratio, rounds
from forward import RULES, SIZES, build

HERE = Path(__file__).parent
ROUTED_RULES = 'adapter "a" { match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16) }\nadapter "b" { match "*.self_attn.{q,v}_proj" apply lora(r=16, alpha=16) }\n'


def _surgeon_and_peft(base, inputs):
    from peft import LoraConfig, get_peft_model

    import surgeon

    mine, theirs = copy.deepcopy(base), copy.deepcopy(base)  # copies outside the timings (a copy costs 0.3-1.2 s here)
    started = time.perf_counter()
    compiled = surgeon.compile(mine, RULES, example_inputs=inputs)
    compile_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, w in compiled.sites():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=generator) * 0.01)
    started = time.perf_counter()
    reference = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_s = time.perf_counter() - started
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for _, path, w in compiled.sites():
            modules[f"base_model.model.{path}"].lora_A["default"].weight.copy_(w.lora_A)
            modules[f"base_model.model.{path}"].lora_B["default"].weight.copy_(w.lora_B)
    return compiled, reference, compile_s, peft_s


def _trainer(model, inputs, params):
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    labels = inputs["input_ids"]

    def step():
        out = model(**inputs, labels=labels)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _floor(base, inputs):
    """The base model, every weight frozen, with a backward down to its input embeddings (what any adapter costs)."""
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    labels = inputs["input_ids"]
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}

    def step():
        embeds = embed(inputs["input_ids"]).detach().requires_grad_()
        model(inputs_embeds=embeds, labels=labels, **kwargs).loss.backward()

    return step


def _ratio(per: dict, name: str, baseline: str, detail: str) -> tuple:
    """(median per-round ratio, detail with its interquartile range): both ran within seconds in each round."""
    ratio, low, high = round_ratio(per, name, baseline)
    return ratio, f"{detail}{'; ' if detail else ''}per-round IQR {low:.3f}..{high:.3f}"


def _subprocess(code: list, timeout: int = 900, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, *code], capture_output=True, text=True, cwd=HERE, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


CHILD = """
import json, resource, sys, time, copy, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
from forward import RULES, build
base, _, inputs = build({size!r})
what = {what!r}
started = time.perf_counter()
if what.startswith("surgeon"):
    import surgeon
    model = surgeon.compile(base, RULES, example_inputs=inputs).train()
else:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
setup = time.perf_counter() - started
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-5)
def step():
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
step()  # the warm-up makes the graphs and the optimizer state
first_step = time.perf_counter() - started - setup
from pathlib import Path
status = lambda field: int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)).split()[1]) / 1024
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the resident set now
step()
print(json.dumps({{"setup_seconds": setup, "first_step_seconds": first_step, "before_step_mib": before,
                  "cached": bool(getattr(getattr(model, "captured", None), "cached", False)),
                  "step_peak_mib": status("VmHWM")}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also row 3 (torch.compile; minutes)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import surgeon

    # A capture cache of this run's own: the first capture below is cold, later processes find it warm.
    cache = tempfile.TemporaryDirectory(prefix="surgeon-bench-cache-")
    os.environ["SURGEON_CACHE_DIR"] = cache.name
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{cache.name}/inductor"  # row 3's first steps compile from nothing
    rows, started_all = {}, time.perf_counter()
    base, _, inputs = build(args.size)
    compiled, reference, compile_s, peft_s = _surgeon_and_peft(base, inputs)
    rows["7 set-up, first capture in this process (surgeon.compile / get_peft_model)"] = (compile_s / peft_s, f"{compile_s:.2f} s / {peft_s:.2f} s")
    fresh = copy.deepcopy(base)
    started = time.perf_counter()
    surgeon.compile(fresh, RULES, example_inputs=inputs)
    again = time.perf_counter() - started
    del fresh
    rows["7 set-up, same architecture again in this process"] = (again / peft_s, f"{again:.2f} s (the program exported in this process)")

    # 1 and 5: forward
    compiled.eval(), reference.eval()
    graph = compiled.graph(**inputs)
    plain = compiled.graph(lowered=False, **inputs)  # the same adapters as plain aten ops (kernels="torch")
    started = time.perf_counter()
    compiled.fold(kwargs=inputs, verify=False)  # the first fold also captures the evaluation graph it folds
    first_fold = time.perf_counter() - started
    folded = compiled.fold(kwargs=inputs)
    with torch.no_grad():
        per = rounds({"base": lambda: base(**inputs), "surgeon": lambda: graph(**inputs), "plain": lambda: plain(**inputs),
                      "peft": lambda: reference(**inputs), "folded": lambda: folded(**inputs)}, args.repeats)
    t = {k: statistics.median(v) for k, v in per.items()}
    rows["1 forward unmerged: surgeon / base"] = _ratio(per, "surgeon", "base", f"{t['surgeon'] * 1e3:.0f} ms / {t['base'] * 1e3:.0f} ms")
    rows["1 forward unmerged: surgeon / PEFT"] = _ratio(per, "surgeon", "peft", f"PEFT {t['peft'] * 1e3:.0f} ms")
    rows["1 forward unmerged: PEFT / base (for reference)"] = _ratio(per, "peft", "base", "")
    rows["1 forward unmerged: surgeon kernels='torch' / base"] = _ratio(per, "plain", "base", "plain aten branches")
    rows["5 forward folded: surgeon / base"] = _ratio(per, "folded", "base", "")

    # 2: training step
    compiled.train(), reference.train()
    labelled = dict(inputs, labels=inputs["input_ids"])
    plain_train = compiled.graph(lowered=False, **labelled)
    steps = {
        "floor": _floor(base, inputs),
        "surgeon": _trainer(compiled, inputs, [p for p in compiled.parameters() if p.requires_grad]),
        "plain": _trainer(plain_train, inputs, [p for p in compiled.parameters() if p.requires_grad]),
        "peft": _trainer(reference, inputs, [p for p in reference.parameters() if p.requires_grad]),
    }
    per = rounds(steps, args.repeats, warmup=2)
    t = {k: statistics.median(v) for k, v in per.items()}
    rows["2 training step: surgeon / floor"] = _ratio(per, "surgeon", "floor", f"{t['surgeon']:.2f} s / {t['floor']:.2f} s")
    rows["2 training step: surgeon / PEFT"] = _ratio(per, "surgeon", "peft", f"PEFT {t['peft']:.2f} s")
    rows["2 training step: PEFT / floor (for reference)"] = _ratio(per, "peft", "floor", "")
    rows["2 training step: surgeon kernels='torch' / floor"] = _ratio(per, "plain", "floor", "plain aten branches")

    # 3: torch.compile (optional: each first compile takes minutes here)
    if args.compile:
        firsts = {}
        compiled_steps = {}
        for name, model in (("surgeon", compiled), ("peft", reference)):
            step = _trainer(torch.compile(model), inputs, [p for p in model.parameters() if p.requires_grad])
            started = time.perf_counter()
            step()
            firsts[name] = time.perf_counter() - started
            compiled_steps[name] = step
        per = rounds(compiled_steps, max(3, args.repeats // 2), warmup=1)
        t = {k: statistics.median(v) for k, v in per.items()}
        rows["3 compiled training step: surgeon / PEFT"] = _ratio(per, "surgeon", "peft", f"{t['surgeon']:.2f} s / {t['peft']:.2f} s")
        rows["3 first compiled step: surgeon / PEFT"] = (firsts["surgeon"] / firsts["peft"], f"{firsts['surgeon']:.1f} s / {firsts['peft']:.1f} s "
                                                           "(inductor's caches empty at the start; PEFT compiles second)")

    # 6: fold time
    folds: dict = {"new": [], "inplace": [], "peft": []}
    for _ in range(3):
        started = time.perf_counter()
        compiled.fold(kwargs=inputs, verify=False)
        folds["new"].append(time.perf_counter() - started)
        started = time.perf_counter()
        compiled.fold(kwargs=inputs, verify=False, inplace=True)  # into the model's own weights, as PEFT's
        folds["inplace"].append(time.perf_counter() - started)
        compiled.unfold()
        model = copy.deepcopy(reference)
        started = time.perf_counter()
        model.merge_and_unload()
        folds["peft"].append(time.perf_counter() - started)
    fold_t = {k: statistics.median(v) for k, v in folds.items()}
    rows["6 fold time: surgeon fold (new weights) / PEFT merge_and_unload"] = (fold_t["new"] / fold_t["peft"],
                                                                             f"{fold_t['new']:.2f} s / {fold_t['peft']:.2f} s "
                                                                             f"(the first fold, capturing its graph: {first_fold:.2f} s)")
    rows["6 fold time: surgeon fold(inplace=True) / PEFT merge_and_unload"] = (fold_t["inplace"] / fold_t["peft"],
                                                                             f"{fold_t['inplace']:.2f} s (keeps the originals for unfold)")

    # 8: routed
    routed = surgeon.compile(copy.deepcopy(base), ROUTED_RULES, example_inputs=inputs).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, w in routed.sites():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=generator) * 0.01)
    ids = torch.tensor([i % 2 for i in range(inputs["input_ids"].shape[0])])
    single, mixed = routed.graph(**inputs), routed.graph(**inputs, adapter_ids=ids)
    routed.set_active(["b"])
    with torch.no_grad():
        per = rounds({"single": lambda: single(**inputs), "routed": lambda: mixed(**inputs, adapter_ids=ids)}, args.repeats)
    t = {k: statistics.median(v) for k, v in per.items()}
    rows["8 routed forward: surgeon routed / single adapter"] = _ratio(per, "routed", "single",
                                                                       f"{t['routed'] * 1e3:.0f} ms / {t['single'] * 1e3:.0f} ms")

    # 4 and 7 (cold and warm): fresh processes. "surgeon-cold" has the capture cache off; "surgeon" finds
    # the captures this process wrote to its cache (the same architecture planned before, in another process).
    child = {what: _subprocess(["-c", CHILD.format(here=str(HERE), threads=args.threads, size=args.size, what=what)],
                               env={"SURGEON_CAPTURE_CACHE": "0"} if what == "surgeon-cold" else None)
             for what in ("surgeon-cold", "surgeon", "peft")}
    assert not child["surgeon-cold"]["cached"] and child["surgeon"]["cached"], "the warm child did not find the capture cache"
    rows["4 training step peak RSS: surgeon / PEFT"] = (child["surgeon-cold"]["step_peak_mib"] / child["peft"]["step_peak_mib"],
                                                       f"{child['surgeon-cold']['step_peak_mib']:.0f} MiB / {child['peft']['step_peak_mib']:.0f} MiB "
                                                       f"(before the step {child['surgeon-cold']['before_step_mib']:.0f} / "
                                                       f"{child['peft']['before_step_mib']:.0f})")
    peft_setup = child["peft"]["setup_seconds"]
    for what, name in (("surgeon-cold", "cold"), ("surgeon", "warm (capture cache)")):
        rows[f"7 set-up in a fresh process, {name}: surgeon / PEFT"] = (
            child[what]["setup_seconds"] / peft_setup, f"{child[what]['setup_seconds']:.2f} s / {peft_setup:.2f} s")
        mine, theirs = (child[w]["setup_seconds"] + child[w]["first_step_seconds"] for w in (what, "peft"))
        rows[f"7 set-up + first training step, fresh process, {name}"] = (mine / theirs, f"{mine:.2f} s / {theirs:.2f} s")

    # 9: planning a 7B-shaped model without weights, cold (an empty capture cache) and warm (planned before)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(HERE / "plan_7b.py"), "--out", f"{tmp}/plan.json"], check=True,
                              capture_output=True, cwd=HERE)
        result = json.loads(Path(f"{tmp}/plan.json").read_text())
    for name, plan in (("cold", result["plan"]), ("warm", result["plan_warm"])):
        rows[f"9 plan 7B-shaped, no weights, {name} (seconds)"] = (
            plan["seconds"], f"{plan['max_rss_bytes'] / 2**20:.0f} MiB peak; imports {plan['import_seconds']:.1f} s, "
            f"open {plan['open_seconds']:.1f} s, torch.export {plan['export_seconds']:.1f} s, "
            f"surgeon's own {plan['surgeon_own_seconds']:.1f} s (roles {plan['roles_seconds']:.1f} s)")

    total = time.perf_counter() - started_all
    print(f"surgeon vs PEFT, {args.size} Llama, {args.threads} thread(s), {args.repeats} rounds, {total:.0f} s in all")
    print(f"{'row':58} {'ratio':>7}  detail")
    for name, (ratio, detail) in rows.items():
        print(f"{name:58} {ratio:7.3f}  {detail}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "threads": args.threads, "repeats": args.repeats, "seconds": total,
                                        "rows": {k: {"ratio": r, "detail": d} for k, (r, d) in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
