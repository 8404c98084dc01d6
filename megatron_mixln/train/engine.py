"""Process-group start-up and the DeepSpeed engine (same code in one process and under any launcher)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from megatron_mixln.config import Config, ConfigError
from megatron_mixln.train.optim import build_optimizer
from megatron_mixln.train.schedule import lr_multiplier


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> Ranks:
    """Join (or, in a plain `python`/`mixln-train` process, create) the default process group through DeepSpeed."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        # The shared-memory collective is a JIT-compiled C++ op (~30 s of g++ on first use); gloo is enough on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    world = dist.get_world_size()
    rank = dist.get_rank()
    return Ranks(rank=rank, world_size=world, dp_rank=rank, dp_size=world)


def gradient_accumulation_steps(config: Config, dp_size: int) -> int:
    train = config.train
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is invalid: expected a multiple of "
            f"train.micro_batch_size x data-parallel size = {train.micro_batch_size} x {dp_size} = {per_step}.")
    return train.global_batch_size // per_step


def deepspeed_config(config: Config, dp_size: int) -> dict:
    """The DeepSpeed JSON config derived from ours; there is one source of truth, the YAML."""
    train = config.train
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, dp_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def check_supported_layout(config: Config, ranks: Ranks) -> None:
    if config.parallel.tp != 1 or config.parallel.pp != 1:
        raise ConfigError(f"parallel.tp={config.parallel.tp} / parallel.pp={config.parallel.pp} is not supported yet: "
                          "this version trains with tp=1 and pp=1 (data parallelism follows the world size).")


def build_engine(model: torch.nn.Module, config: Config, ranks: Ranks):
    """Wrap model, optimiser and LR schedule in a DeepSpeed engine; returns (engine, optimizer, scheduler)."""
    import deepspeed

    train = config.train
    optimizer = build_optimizer(model.parameters(), train.optimizer, train.lr, train.betas, train.adam_eps,
                                train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, train.steps, train.warmup_fraction, train.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, ranks.dp_size))
    return engine, optimizer, scheduler
