"""Every collective the training code starts runs on a tensor the process group can serve on a GPU node.

Under NCCL a process group serves CUDA tensors only; a host tensor fails ("No backend type associated with device
type cpu") at the first step of any dp > 1 or pp > 1 run. On CPU the rule is emulated: a tensor that code under
megatron_mixln/train/ creates without naming a device lands on `meta`, which gloo cannot serve, so a collective
on it is refused exactly where NCCL would refuse a host tensor; every collective's tensors are recorded too.
"""
import os

import pytest
import torch.distributed as dist

from training_runs import HostTensorsAreNotServed, recording_collectives, tiny, train_one_after_another

TRAIN_CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_mixln", "train")


def test_the_emulation_rejects_a_host_tensor_made_by_the_training_code(tmp_path):
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    # What loop.py did before: a device-less tensor, all-reduced. Compiled as if it lived in train/.
    old_code = compile("import torch, torch.distributed as dist\n"
                       "totals = torch.zeros(2, dtype=torch.float64)\n"
                       "dist.all_reduce(totals)\n", os.path.join(TRAIN_CODE, "old_loop.py"), "exec")
    with recording_collectives([]), HostTensorsAreNotServed(), pytest.raises(RuntimeError, match="meta"):
        exec(old_code, {})
    fixed_code = compile("import torch, torch.distributed as dist\n"
                         "totals = torch.zeros(2, dtype=torch.float64, device='cpu')\n"
                         "dist.all_reduce(totals)\n", os.path.join(TRAIN_CODE, "new_loop.py"), "exec")
    record = []
    with recording_collectives(record), HostTensorsAreNotServed():
        exec(fixed_code, {})
    assert record and record[0][1] == ["cpu"]


LAYOUTS = {"dp2-zero3": ["parallel.zero_stage=3"], "pp2-zero1": ["parallel.pp=2", "parallel.zero_stage=1"],
           "tp2": ["parallel.tp=2"]}


@pytest.fixture(scope="module")
def emulated_runs(tmp_path_factory):
    """Per layout of LAYOUTS, its ranks' summaries with the collectives they recorded, all trained in one launch
    of two processes (a launch costs more than these three-step runs)."""
    folder = tmp_path_factory.mktemp("emulated")
    # 7 eval sequences in micro-batches of 2 over 2 ranks: uneven, so padding batches run too; skip mode with a
    # NaN gradient at step 2 exercises the non-finite path; layer norms every step.
    results = train_one_after_another(
        2, [tiny(folder / "cache", folder / name, *layout, "train.steps=3", "train.micro_batch_size=2",
                 "train.eval_sequences=7", "train.eval_every=2", "train.on_nonfinite=skip")
            for name, layout in LAYOUTS.items()],
        folder, env={"MIXLN_TEST_FAULT": "grad@2"}, emulate_nccl=True)
    return dict(zip(LAYOUTS, results))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_collectives_use_only_the_communication_device(layout, emulated_runs):
    for rank, result in enumerate(emulated_runs[layout]):
        assert "error" not in result, result.get("traceback", result["error"])
        assert result["skipped"] == [2] and result["eval_loss"] is not None
        devices = {device for _, tensor_devices, _ in result["collectives"] for device in tensor_devices}
        assert devices == {"cpu"}, (rank, devices)
        ours = [entry for entry in result["collectives"] if f"{os.sep}megatron_mixln{os.sep}" in entry[2]]
        assert ours, "the recorder saw none of the training code's own collectives"
