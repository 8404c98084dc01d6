"""Process layout for tensor x data x pipeline parallelism, on DeepSpeed's topology and process groups.

Ranks follow `PipeModelDataParallelTopology` (as Megatron-DeepSpeed and GPT-NeoX): tensor-parallel ranks are
innermost (same node), then data-parallel, then pipeline stages. The layout is an object handed to whoever
needs it; there is no global parallel state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_mixln.parallel.tensor_parallel import TensorParallel


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pp: int
    dp: int
    grid: object  # deepspeed PipelineParallelGrid: the `mpu` DeepSpeed reads its groups from

    @property
    def tensor_parallel(self) -> TensorParallel:
        if self.tp == 1:
            return TensorParallel()
        return TensorParallel(self.tp, self.grid.get_slice_parallel_rank(), self.grid.get_slice_parallel_group())

    @property
    def dp_rank(self) -> int:
        return self.grid.get_data_parallel_rank()

    @property
    def stage(self) -> int:
        return self.grid.get_stage_id()

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    @property
    def model_parallel_group(self):
        """The ranks that together hold one model replica (all stages and TP ranks of one DP index)."""
        return self.grid.get_model_parallel_group()


def build_layout(tp: int, pp: int) -> ParallelLayout:
    """Create the process groups of a tp x pp x dp layout over the initialised default group."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    from megatron_mixln.parallel.launch import data_parallel_size

    world = dist.get_world_size()
    dp = data_parallel_size(world, tp, pp)
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return ParallelLayout(tp=tp, pp=pp, dp=dp, grid=PipelineParallelGrid(topology=topology))
