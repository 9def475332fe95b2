"""Data-parallel LoRA training with torchrun on the CPU (gloo): 2 processes x batch 1 = 1 process x batch 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, scaled
from safetensors.torch import load_file

from fluxpipe.parallel.distributed import World, collective_device

BIN = Path(sys.executable).parent


def test_rows_split_a_batch_evenly() -> None:
    assert [World(r, 2).rows(4) for r in range(2)] == [[0, 1], [2, 3]]
    assert [World(r, 2).rows(3) for r in range(2)] == [[0, 1], [2]]
    assert [World(r, 2).rows(1) for r in range(2)] == [[0], []]
    assert [World(r, 3).rows(7) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_two_processes_train_the_lora_of_one_with_twice_the_batch(demo_dir: Path, tmp_path: Path) -> None:
    from test_train_lora import seed_command

    per_process = _batch1(tmp_path)

    def args(out: Path, dataset: Path = REPO / "config/demo/dataset.toml") -> list[str]:
        a = seed_command(demo_dir, out, "--network_train_unet_only", "--optimizer_type", "AdamW", "--save_state")
        a[a.index("--dataset_config") + 1] = str(dataset)
        a[a.index("--mixed_precision") + 1] = "no"  # fp32: the two layouts differ only by float summation order
        return ["train", "lora", *a]

    one = _run(args(tmp_path / "one"), 1)
    assert one.returncode == 0, one.stderr[-2000:]
    # the 2-process run in two segments: 2 processes stop at step 3 (mid-epoch), 2 processes resume and finish
    first = _run([*args(tmp_path / "two", per_process), "--stop_at_step", "3"], 2)
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "two/my_flux_lora-seg00000003-state"
    rest = _run([*args(tmp_path / "two", per_process), "--resume", str(state)], 2)
    assert rest.returncode == 0 and "resuming from" in rest.stderr, rest.stderr[-3000:]
    a = load_file(str(tmp_path / "one/my_flux_lora.safetensors"))
    b = load_file(str(tmp_path / "two/my_flux_lora.safetensors"))
    assert _worst(a, b) < 1e-5
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)
    assert not list((tmp_path / "two").glob("*.tmp*"))  # rank 0 alone wrote, atomically
    # the 2-process run's mid-epoch state, resumed by 1 process: the world size may change between runs
    resumed = _run([*args(tmp_path / "resumed"), "--resume", str(state)], 1)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert _worst(a, load_file(str(tmp_path / "resumed/my_flux_lora.safetensors"))) < 1e-5


def _run(command: list[str], processes: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    launch = (
        [str(BIN / "fluxpipe")]
        if processes == 1
        else [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "-m", "fluxpipe.cli"]
    )
    return subprocess.run([*launch, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(600))


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _batch1(tmp_path: Path) -> Path:
    per_process = tmp_path / "batch1.toml"
    per_process.write_text((REPO / "config/demo/dataset.toml").read_text().replace("batch_size = 2", "batch_size = 1"))
    return per_process


def test_two_processes_train_the_controlnet_of_one_with_twice_the_batch(demo_dir: Path, tmp_path: Path) -> None:
    from test_train_controlnet import cn_command

    def args(out: Path, dataset: Path | None = None) -> list[str]:
        a = cn_command(demo_dir, out, "--save_state", "--max_grad_norm", "0.01", dataset=dataset)
        a[a.index("--mixed_precision") + 1] = "no"  # fp32: the two layouts differ only by float summation order
        return ["train", "controlnet", *a]

    one = _run(args(tmp_path / "one"), 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(args(tmp_path / "two", _batch1(tmp_path)), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one/cn.safetensors")), load_file(str(tmp_path / "two/cn.safetensors"))
    assert _worst(a, b) < 1e-5
    fresh = load_file(str(tmp_path / "one/cn-000001.safetensors"))
    assert _worst(a, fresh) > 1e-4  # it trained
    assert not list((tmp_path / "two").glob("*.tmp*")) and not list((tmp_path / "two").glob(".*.tmp"))


def test_two_fsdp_processes_fine_tune_the_dit_of_one_with_twice_the_batch(demo_dir: Path, tmp_path: Path) -> None:
    """FSDP2: each process holds half of every weight, gradient and Adam moment; the saved DiT, its state and a
    resume across a change of world size are the one-process run's."""
    from test_train_full import full_command

    def args(out: Path, dataset: Path, *extra: str) -> list[str]:
        a = full_command(demo_dir, out, "--save_state", *extra)
        for flag in ("--fused_backward_pass", "--full_bf16"):
            a.remove(flag)
        del a[a.index("--optimizer_args") : a.index("--optimizer_args") + 4]
        # fp32 AdamW with the gradient norm clipped (the clip sees the whole sharded gradient)
        for flag, value in (
            ("--optimizer_type", "AdamW"),
            ("--mixed_precision", "no"),
            ("--save_precision", "float"),
            ("--max_grad_norm", "0.01"),
            ("--dataset_config", str(dataset)),
        ):
            a[a.index(flag) + 1] = value
        return ["train", "full", *a]

    demo_toml = REPO / "config/demo/dataset.toml"
    one = _run(args(tmp_path / "one", demo_toml), 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(args(tmp_path / "two", _batch1(tmp_path)), 2)
    assert two.returncode == 0 and "sharded across 2 processes" in two.stderr, two.stderr[:8000]
    a, b = load_file(str(tmp_path / "one/ft.safetensors")), load_file(str(tmp_path / "two/ft.safetensors"))
    assert _worst(a, b) < 1e-5
    assert _worst(a, load_file(str(tmp_path / "one/ft-000001.safetensors"))) > 1e-5  # it trained
    # the states hold the same full weights and Adam moments, in the one-process layout
    sa = load_file(str(tmp_path / "one/ft-000001-state/tensors.safetensors"))
    sb = load_file(str(tmp_path / "two/ft-000001-state/tensors.safetensors"))
    assert _worst(sa, sb) < 1e-5
    # the 2-process epoch-1 state resumed by 1 process, and the 1-process one by 2: both end as the run did
    resumed = _run([*args(tmp_path / "r1", demo_toml), "--resume", str(tmp_path / "two/ft-000001-state")], 1)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert _worst(a, load_file(str(tmp_path / "r1/ft.safetensors"))) < 1e-5
    resumed = _run([*args(tmp_path / "r2", _batch1(tmp_path)), "--resume", str(tmp_path / "one/ft-000001-state")], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _worst(a, load_file(str(tmp_path / "r2/ft.safetensors"))) < 1e-5


def test_fsdp_refuses_what_cannot_step_sharded_weights(demo_dir: Path, tmp_path: Path) -> None:
    from test_train_full import full_command

    result = _run(["train", "full", *full_command(demo_dir, tmp_path)], 2)  # the README's: fused Adafactor
    assert result.returncode != 0 and "--fused_backward_pass" in result.stderr, result.stderr[-2000:]
    a = full_command(demo_dir, tmp_path)
    a.remove("--fused_backward_pass")
    result = _run(["train", "full", *a], 2)
    assert result.returncode != 0 and "cannot step FSDP-sharded weights" in result.stderr, result.stderr[-2000:]


def test_part_weights_each_rank_by_its_share() -> None:
    assert World().part(3) == (None, 1.0)
    assert [World(r, 2).part(3) for r in range(2)] == [([0, 1], 4 / 3), ([2], 2 / 3)]  # 2 x mean: sum / 3 x 2
    assert World(1, 2).part(1) == ([], 0.0)


class _Done(dist._Work):
    def wait(self, timeout: object = None) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        future.set_result([])
        return future


class DeviceOnlyGroup(dist.ProcessGroup):
    """NCCL's rules on a machine without a GPU: a collective on a CPU tensor fails, and so does a barrier that
    does not name its GPU. The device is emulated by ``meta`` (tensors without values, so a host sync fails too)."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self.calls: list[tuple[str, list[str]]] = []

    def _check(self, name: str, tensors: list[torch.Tensor]) -> _Done:
        cpu = [t for t in tensors if t.device.type == "cpu"]
        if cpu:
            raise RuntimeError(f"{name}: CPU tensor {tuple(cpu[0].shape)} {cpu[0].dtype} (NCCL has no CPU collectives)")
        self.calls.append((name, [str(t.device) for t in tensors]))
        return _Done()

    def allreduce(self, tensors: list[torch.Tensor], opts: object) -> _Done:
        return self._check("all_reduce", tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: object) -> _Done:
        return self._check("broadcast", tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: object) -> _Done:
        return self._check("all_gather", [*inputs, *(t for ts in outputs for t in ts)])

    def barrier(self, opts: dist.BarrierOptions) -> _Done:
        if not opts.device_ids:
            raise RuntimeError("barrier: no device_ids (NCCL would guess the GPU)")
        self.calls.append(("barrier", [f"cuda:{i}" for i in opts.device_ids]))
        return _Done()

    def getBackendName(self) -> str:  # noqa: N802 - the ProcessGroup API's name
        return "device_only"


_GROUPS: list[DeviceOnlyGroup] = []


def _device_only(store: object, rank: int, size: int, timeout: object) -> DeviceOnlyGroup:
    _GROUPS.append(DeviceOnlyGroup(rank, size))
    return _GROUPS[-1]


dist.Backend.register_backend("device_only", _device_only, devices=["cuda"])


@pytest.fixture
def device_only_group() -> DeviceOnlyGroup:
    """A 2-rank group (this process is rank 0; the other is never asked: the group only checks and records)."""
    dist.init_process_group("device_only", store=dist.HashStore(), rank=0, world_size=2)
    try:
        yield _GROUPS[-1]
    finally:
        dist.destroy_process_group()


def test_collectives_run_on_the_device_under_a_group_that_refuses_cpu_tensors(
    device_only_group: DeviceOnlyGroup,
) -> None:
    with pytest.raises(RuntimeError, match="CPU tensor"):  # the checker works: what today's NCCL says
        dist.all_reduce(torch.tensor([0.5, 1.0], dtype=torch.float64))
    w = World(rank=0, size=2, local_rank=1, device="meta")  # rank 0 of 2, the loss on its (emulated) GPU
    loss = torch.tensor(0.25, device="meta")
    mean = w.mean(loss, 3)  # a CPU tensor or a host sync (float(), .item()) of the device loss raises here
    assert mean.device.type == "meta" and mean.shape == () and mean.dtype == torch.float64
    World(rank=0, size=2, local_rank=1, device="cuda:1").barrier()
    assert device_only_group.calls == [("all_reduce", ["meta"]), ("barrier", ["cuda:1"])]


def test_the_collective_device_follows_the_backend() -> None:
    assert collective_device("nccl", 1) == "cuda:1" and collective_device("gloo", 1) == "cpu"
    assert World().device == "cpu"


def test_only_the_world_and_fsdp_call_collectives() -> None:
    """Every collective goes through World (on its device) or torch's FSDP2 state-dict functions (on the mesh's)."""
    import re

    callers = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "fluxpipe").rglob("*.py")
        if re.search(
            r"torch\.distributed\.(all_|broadcast|barrier|reduce|gather|scatter|send|recv)|\bdist\.", p.read_text()
        )
    }
    assert callers == {"fluxpipe/parallel/distributed.py"}, callers


def test_the_loss_is_reduced_once_per_optimizer_step(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With gradient accumulation the ranks' losses meet once a step (each a host sync), not every micro-batch."""
    from test_train_lora import seed_command

    from fluxpipe.cli import main
    from fluxpipe.stages import train_lora

    calls: list[int] = []

    class Counted(World):
        def mean(self, value: torch.Tensor, weight: int) -> torch.Tensor:
            calls.append(weight)
            return World.mean(self, value, weight)

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(train_lora, "world", lambda: Counted())
    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--gradient_accumulation_steps", "2")
    args[args.index("--max_train_epochs") + 1] = "1"
    assert main(["train", "lora", *args]) == 0
    records = [json.loads(line) for line in (tmp_path / "my_flux_lora-loss.jsonl").read_text().splitlines()]
    assert len(records) == 3 and len(calls) == 3  # 5 batches of 2, accumulated in pairs: 3 optimizer steps
