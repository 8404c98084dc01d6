"""Process-group start-up, this rank's part of the model, and the DeepSpeed engine (same code in one process and
under any launcher)."""
from __future__ import annotations

import contextlib
import importlib.util
from datetime import timedelta
from pathlib import Path

import torch

from megatron_mixln.config import Config, ConfigError, ParallelConfig
from megatron_mixln.train.optim import build_optimizer
from megatron_mixln.train.schedule import lr_multiplier


def init_distributed(env=None, startup_timeout_minutes: float = ParallelConfig.startup_timeout_minutes,
                     bind_device: bool = True) -> None:
    """Join the default process group (torchrun, deepspeed, srun, mpirun, or a plain single process); `env` is
    the LaunchEnv already discovered, if any.

    `startup_timeout_minutes` (parallel.startup_timeout_minutes) bounds the wait for the other ranks, and is
    the process group's timeout too (DeepSpeed's own default is 10 minutes).

    On a GPU the backend is NCCL, which serves CUDA tensors only: every collective of ours runs on the
    communication device (train/step.py), never on a host tensor. `bind_device=False` (mixln-preflight) joins
    without making LOCAL_RANK's GPU current and without DeepSpeed's eager NCCL connect, which needs it: a rank
    whose GPU is missing still joins, and reports.
    """
    import deepspeed
    import torch.distributed as dist

    from megatron_mixln.parallel.launch import apply_launch_env, discover_launch_env, wait_for_ranks

    if not dist.is_initialized():
        env = env or discover_launch_env()
        apply_launch_env(env)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(minutes=startup_timeout_minutes)
        if env.world_size == 1:
            # One process needs no rendezvous: an in-memory store cannot collide with another job's port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            wait_for_ranks(env, startup_timeout_minutes)  # says who is missing, and a taken MASTER_PORT
            if not bind_device:  # else deepspeed.init_distributed creates it, with NCCL's eager connect
                dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                        timeout=timeout)
        if not torch.cuda.is_available():
            # The shared-memory collective is a JIT-compiled C++ op (~30 s of g++ on first use); gloo is enough on CPU.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        elif bind_device:
            import os

            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=False, timeout=timeout)


def leave_process_group() -> None:
    """Destroy the default process group while the interpreter is still whole, once every rank is done with it.

    Left to the exit, gloo's worker threads are torn down during interpreter finalisation with work that still
    holds Python references, and the process dies of SIGABRT ("terminate called without an active exception")
    after a run that succeeded; NCCL asks for the same call so that no rank exits with a transfer in flight
    (PyTorch's "Shutdown" documentation). Call it only where every rank gets to it: after an error raised on one
    rank, a peer may be stuck in a collective, and destroying could wait on it.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def build_layout(config: Config):
    from megatron_mixln.parallel.topology import build_layout as _build

    return _build(config.parallel.tp, config.parallel.pp)


def gradient_accumulation_steps(config: Config, dp_size: int) -> int:
    """Micro-batches per optimiser step on each data-parallel rank (the pipeline's micro-batch count)."""
    train = config.train
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is invalid: expected a multiple of "
            f"train.micro_batch_size x data-parallel size = {train.micro_batch_size} x {dp_size} = {per_step}.")
    return train.global_batch_size // per_step


def deepspeed_config(config: Config, dp_size: int) -> dict:
    """The DeepSpeed JSON config derived from ours; there is one source of truth, the YAML."""
    train, parallel = config.train, config.parallel
    zero = {"stage": parallel.zero_stage}
    bf16 = train.precision == "bf16"
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if parallel.zero_stage == 3:
        # Gather each parameter only when its layer runs; keep nothing resident between steps.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9})
    precision = {}
    if bf16:
        # Accumulate over micro-batches and reduce over DP ranks in fp32 (DeepSpeed's default would be bf16).
        precision = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, dp_size),
        # fp32 at ZeRO-0 has no DeepSpeed optimiser wrapper: GuardedStep (train/optim.py) clips there, after
        # reading the pre-clip norm and checking it is finite.
        "gradient_clipping": train.grad_clip if bf16 or parallel.zero_stage >= 1 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        **precision,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        # DeepSpeed's monitor writes our metrics records (train/metrics.py) to TensorBoard and W&B, on rank 0.
        "tensorboard": {"enabled": train.tensorboard, "output_path": train.out_dir, "job_name": "tensorboard"},
        "wandb": {"enabled": train.wandb, "project": train.wandb_project, "group": Path(train.out_dir).name},
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # We hand DeepSpeed torch's Adam (no JIT-compiled op); offload then runs torch's Adam on the CPU.
        "zero_force_ds_cpu_optimizer": False,
    }


@contextlib.contextmanager
def model_construction(config: Config, layout):
    """Under ZeRO-3, build parameters already partitioned (no rank ever holds the whole model).

    zero.Init creates each parameter on this rank's GPU (no offload_param: its remote device is the local one) in
    the training dtype, bf16 under train.precision=bf16, and partitions it as soon as its module is built: the host
    never holds a copy of the model, not even in fp32. initialize_weights then writes one whole parameter at a time
    (its fp32 initial value on the host, at most the largest parameter: 0.5 GB for the 7B embedding).
    The dtype comes from the config (bf16.enabled; DeepSpeed 0.19.8, partition_parameters.py `_set_dtype`), not
    from zero.Init's `dtype` argument: given one, `_set_dtype` keeps it only where the accelerator reports fp16
    support, and on a CPU without it would build an fp32 run's parameters in bf16.
    """
    if config.parallel.zero_stage == 3:
        import deepspeed

        # Partition over the data-parallel group only: tensor-parallel ranks hold different shards.
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(config, layout.dp), mpu=layout.grid,
                                 data_parallel_group=layout.dp_group):
            yield
    else:
        yield


def build_training_model(config: Config, layout) -> torch.nn.Module:
    """This rank's part of the model, initialised exactly as the single-process model would be: the unsplit
    model (under ZeRO-3 built already partitioned), or this rank's pipeline stage."""
    from megatron_mixln.model import ops
    from megatron_mixln.model.llama import (MixLNForCausalLM, compile_decoder_layers, gather_whole_layers_under_zero3,
                                            initialize_weights, set_z_loss)
    from megatron_mixln.model.stages import build_pipeline
    from megatron_mixln.parallel.tensor_parallel import mark_norm_owners
    from megatron_mixln.train.init_from import init_from_applies, load_init_from
    from megatron_mixln.train.module_export import gathered

    ops.check_backend(config.model.kernels)
    seed = config.train.seed
    if layout.pp > 1:
        model = build_pipeline(config.model, layout, seed, config.parallel.pipeline_partition,
                               config.parallel.activation_checkpointing)
    else:
        with model_construction(config, layout):
            model = MixLNForCausalLM(config.model, layout.tensor_parallel)
        model.activation_checkpointing = config.parallel.activation_checkpointing
        initialize_weights(model, config.model, seed, layout.tensor_parallel,
                           gathered=gathered if config.parallel.zero_stage == 3 else None)
    if init_from_applies(config):  # model.init_from on a fresh start: every parameter overwritten, in any layout
        load_init_from(model, config, layout)
    if config.train.compile:
        compile_decoder_layers(model)
        if config.parallel.zero_stage == 3:
            gather_whole_layers_under_zero3(model)
    mark_norm_owners(model, layout.tensor_parallel)
    set_z_loss(model, config.train.z_loss)  # the head adds it in training (under PP: the last stage's head)
    return model


def build_engine(model: torch.nn.Module, config: Config, layout):
    """Wrap model, optimiser and LR schedule in a DeepSpeed engine; returns (engine, optimizer, scheduler).

    With pipeline parallelism `model` is a PipelineModule and the engine a PipelineEngine (1F1B).
    """
    import deepspeed

    train = config.train
    if train.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb=true is invalid here: the wandb package is not installed; "
                          "pip install 'megatron_mixln[wandb]' (and log in, or set WANDB_MODE=offline).")
    optimizer = build_optimizer(model.parameters(), train.optimizer, train.lr, train.betas, train.adam_eps,
                                train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, train.steps, train.warmup_fraction, train.min_lr_ratio))
    mpu = None if config.parallel.pp > 1 else layout.grid  # a PipelineModule brings its own grid
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
                                           config=deepspeed_config(config, layout.dp))
    return engine, optimizer, scheduler
