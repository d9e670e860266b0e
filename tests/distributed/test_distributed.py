"""A compiled model trained by 2 processes (torchrun, gloo on the CPU) equals one process on the whole batch.

Run these alone with ``python -m pytest -m distributed``. Each test starts its own job
with a timeout, so a hang fails the test instead of the suite.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
EXAMPLE = ROOT / "examples" / "distributed" / "train.py"

pytestmark = pytest.mark.distributed
STEPS = 3


def launch(*command, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*command], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return launch(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args), timeout=timeout)


def _example():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import train as example
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return example


def _assert_same_files(got: Path, expected: Path, rtol: float, atol: float) -> None:
    mine, theirs = load_file(got / "adapter_model.safetensors"), load_file(expected / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and len(mine) > 0
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=rtol, atol=atol, msg=key)
    assert (got / "adapter_config.json").read_text() == (expected / "adapter_config.json").read_text()


def test_ddp_fsdp2_and_the_trainer_train_like_one_process_on_the_whole_batch(tmp_path):
    """One job (launched by accelerate, whose --multi_gpu launcher is torchrun; on a CPU machine it starts CPU processes):
    DDP, then FSDP2, then transformers' Trainer."""
    done = launch(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), "train", str(tmp_path), str(STEPS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    example = _example()
    # DDP: both ranks hold the same adapters (and the same train-module copy), equal to one process on all rows.
    rank0, rank1 = (load_file(tmp_path / f"ddp-rank{r}.safetensors") for r in (0, 1))
    single = example.train("single", STEPS, tmp_path / "single")
    assert rank0.keys() == rank1.keys() == {n for n, _ in single.trainable_parameters()}
    for name, param in single.trainable_parameters():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
        torch.testing.assert_close(rank0[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert all(rank0[n].abs().max() > 0 for n in rank0 if "lora_B" in n)  # trained: B starts at zero
    _assert_same_files(tmp_path / "ddp" / "adapter", tmp_path / "single" / "adapter", rtol=1e-5, atol=1e-6)
    # FSDP2: rank 0 wrote the adapter gathered from both shards, as one process would.
    _assert_same_files(tmp_path / "fsdp" / "adapter", tmp_path / "single" / "adapter", rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == ["adapter"]  # no stray files from rank 1
    # The Trainer: 2 processes, each on half of every global batch; the loss falls and rank 0 saved the adapter.
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("trainer losses")]
    losses = [float(x) for x in line.split()[2 : 2 + STEPS + 1]]
    assert len(losses) == STEPS + 1 and losses[-1] < losses[0] and "(2 processes)" in line
    assert (tmp_path / "trainer" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_crashing_rank_fails_the_job_with_its_error_instead_of_hanging(tmp_path):
    started = time.monotonic()
    done = torchrun(WORKER, "crash", tmp_path, timeout=150)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stdout + done.stderr
    assert time.monotonic() - started < 120


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (FSDP2 with one shard runs the same code paths)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_inner_fsdp_groups_and_mixed_trainable_dtypes_are_refused_clearly(one_process_group):
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    import surgeon
    from surgeon.capture.demos import build_demo
    from surgeon.compiled.distributed import fully_shard
    from surgeon.grammar import SurgeryError

    mixed = surgeon.compile(build_demo("llama").to(torch.bfloat16), 'match "*.q_proj" apply lora(r=2)\nmatch "lm_head" train')
    with pytest.raises(SurgeryError, match=r"one dtype; this model trains .*lora_A \(float32\), trained\.lm_head\.weight \(bfloat16\)") as caught:
        fully_shard(mixed)
    assert "adapter_dtype" in caught.value.diagnostics[0].hint
    nested = surgeon.compile(build_demo("llama"), 'match "*.q_proj" apply lora(r=2)')
    torch_fully_shard(nested.base_model.model.layers[0])
    with pytest.raises(SurgeryError, match=r"fully_shard was applied to 'base_model.model.layers.0' inside"):
        fully_shard(nested)


def test_a_sharded_model_runs_its_graphs_on_the_gathered_weights_and_saves_whole_tensors(one_process_group, tmp_path):
    """FSDP2 of a bfloat16 base with float32 adapters (mixed dtypes: FSDP2 gathers both, reduces float32 gradients)."""
    import surgeon
    from surgeon.capture.demos import build_demo
    from surgeon.compiled.distributed import fully_shard
    from surgeon.grammar import SurgeryError

    from ..surgeon._peft_reference import inputs

    rules = 'match "*.{q,v}_proj" apply lora(r=4, alpha=8)'
    plain, sharded = (surgeon.compile(build_demo("llama").to(torch.bfloat16), rules) for _ in range(2))
    with torch.no_grad():
        for (_, p), (_, q) in zip(plain.trainable_parameters(), sharded.trainable_parameters()):
            p.normal_(0, 0.1)
            q.copy_(p)
    expected = plain(**inputs()).loss
    expected.backward()
    sharded(**inputs())  # a graph captured before sharding: FSDP2 then swaps every parameter it read
    fully_shard(sharded)
    got = sharded(**inputs()).loss
    got.backward()
    torch.testing.assert_close(got, expected)
    assert {p.dtype for _, p in sharded.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in sharded.base_model.parameters()} == {torch.bfloat16}
    for (name, p), (_, q) in zip(plain.trainable_parameters(), sharded.trainable_parameters()):
        assert type(q).__name__ == "DTensor"  # at rest: sharded (one shard here)
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, msg=name)
    sharded.save_adapter(tmp_path / "sharded")
    plain.save_adapter(tmp_path / "plain")
    _assert_same_files(tmp_path / "sharded", tmp_path / "plain", rtol=0, atol=0)
    with pytest.raises(SurgeryError, match="sharded by FSDP"):
        sharded.save_pretrained(tmp_path / "merged")
