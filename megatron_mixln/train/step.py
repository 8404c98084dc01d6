"""One training step and one evaluation, done the same way in every tp x pp x dp layout.

`StepEngine` owns everything the loop must not branch on: the communication device and every collective,
loss and token accounting, the decision that a step was bad, gradient norms (global and per layer) and
evaluation. Its two implementations differ only in how micro-batches run: `MicroBatchSteps` (forward and
backward per micro-batch through the DeepSpeed engine) and `PipelineSteps` (DeepSpeed's 1F1B PipelineEngine),
as Megatron's `get_forward_backward_func` returns one schedule or the other behind one signature.

Non-finite steps are skipped by construction, not by a flag: a non-finite loss makes its own gradient
non-finite (`poison_if_nonfinite`), DeepSpeed's optimiser wrappers (bf16, ZeRO-1/2/3) skip an update whose
global gradient norm is not finite (no weight, moment or LR-schedule change), and the one path without a
wrapper (fp32 ZeRO-0) gets the same contract from `GuardedStep` (train/optim.py). The engine then reports
whether the update was applied; nothing carries over to the next step.

Collectives: every tensor handed to torch.distributed here lives on `self.device`, the device the backend
serves (CUDA under NCCL, CPU under gloo). Host tensors are never communicated.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_mixln.config import Config, ModelConfig
from megatron_mixln.model import IGNORE_INDEX, layer_index_of
from megatron_mixln.model.norms import has_embedding_norm

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), int64 [micro_batch, seq_len], on the host
# Test-only: "loss@STEP" or "grad@STEP" makes that step non-finite; "batch@B" multiplies the LR of the update made
# on global batch B by BAD_BATCH_LR_FACTOR (a harmful update tied to the data, whatever step reads it).
FAULT_VARIABLE = "MIXLN_TEST_FAULT"
BAD_BATCH_LR_FACTOR = 1e3


@dataclass
class StepResult:
    """One step's outcome. `loss` (and `grad_norm` where DeepSpeed keeps it on the device) are device scalars:
    reading them is a host sync, which the loop makes once per logged step (loop.read_to_host), not per step."""

    loss: torch.Tensor  # the objective's value over the whole global batch (NaN when it was not finite)
    target_tokens: int  # positions with a target in the global batch (padding excluded)
    applied: bool  # False: the update was skipped (non-finite loss or gradient); weights and schedule unchanged
    grad_norm: torch.Tensor | float | None  # global L2 norm of the gradient before clipping
    layer_grad_norms: dict[str, float] = field(default_factory=dict)
    layer_update_norms: dict[str, float] = field(default_factory=dict)  # ||w_after - w_before|| per layer
    outlier: bool = False  # not applied because the loss-spike guard judged it an outlier (train/guard.py)


@dataclass
class EvalResult:
    loss: float | None  # token-weighted mean cross-entropy; None without held-out data
    sequences: int
    tokens: int


def communication_device() -> torch.device:
    """The device collectives run on: the current CUDA device (NCCL serves nothing else), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """The loss itself when finite; otherwise a loss whose gradient is NaN, so the optimiser's non-finite
    gradient check skips the update even where a non-finite loss would leave finite gradients (e.g. an
    infinite target logit). No host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)


def layer_norm_keys(config: ModelConfig) -> list[str]:
    """Names of the per-layer gradient norms: embed_tokens (and Peri-LN's embed_layernorm), layer_000 ...
    layer_{L-1}, norm, lm_head."""
    embedding = ["embed_tokens"] + (["embed_layernorm"] if has_embedding_norm(config) else [])
    return embedding + [f"layer_{i:03d}" for i in range(config.num_layers)] + ["norm", "lm_head"]


def layer_norm_key(name: str) -> str:
    """`model.layers.7.mlp.up_proj.weight` -> `layer_007`; `model.norm.weight` -> `norm`."""
    index = layer_index_of(name)
    return f"layer_{index:03d}" if index is not None else name.removeprefix("model.").removesuffix(".weight")


def counts_here(param: torch.nn.Parameter) -> bool:
    """Whether this rank counts `param` in a model-wide norm: tensor-parallel shards everywhere, replicated
    parameters on TP rank 0 only (`model_parallel`, set by parallel.tensor_parallel.mark_norm_owners)."""
    return bool(getattr(param, "model_parallel", True))


@dataclass(frozen=True)
class Fault:
    """Test-only fault switch (MIXLN_TEST_FAULT): make step `step` non-finite through its loss or, with a
    finite loss, through one gradient (injected on the last rank only, so every rank must agree to skip); or
    ("batch") make the update on global batch `step` harmful, on every rank."""

    kind: str
    step: int  # the step, or for "batch" the global batch

    @staticmethod
    def from_env() -> "Fault | None":
        spec = os.environ.get(FAULT_VARIABLE)
        if not spec:
            return None
        kind, _, step = spec.partition("@")
        if kind not in ("loss", "grad", "batch") or not step.isdigit():
            raise ValueError(f"{FAULT_VARIABLE}={spec!r} is invalid: expected loss@STEP, grad@STEP or batch@BATCH.")
        return Fault(kind, int(step))


class StepEngine:
    """The step and evaluation interface the training loop uses; see the module docstring."""

    def __init__(self, engine, config: Config, layout, name_of: Callable[[str], str] = lambda name: name):
        self.engine = engine
        self.module = engine.module
        self.config = config
        self.layout = layout
        self.tp = layout.tensor_parallel
        self.name_of = name_of  # local parameter name -> consolidated name
        self.device = communication_device()
        self.micro_batches = engine.gradient_accumulation_steps()
        self.layer_keys = layer_norm_keys(config.model)
        self.fault = Fault.from_env()
        self.is_fault_rank = dist.get_rank() == dist.get_world_size() - 1
        self._step = 0
        self._token_scale = 1.0  # (micro-batches x dp) / global targets: see objective()
        self._evaluating = False
        self._want_layer_norms = False
        self._layer_norms: dict[str, float] = {}
        self._update_norms: dict[str, float] = {}
        self.guard = None  # the loss-spike guard (train/guard.py), set by the loop when guard.action is not off
        self._step_loss: torch.Tensor | None = None  # the global batch's loss, on every rank before the update
        self._vetoed = False
        # Per-layer norms must read the reduced, unclipped gradients, which exist only between the last backward
        # and the update: both engines pass through _take_model_step there (DeepSpeed 0.19.8).
        take_model_step = engine._take_model_step

        def take_model_step_after_reading_gradients(*args, **kwargs):
            global _judge
            if self.guard is not None:
                self._step_loss = self._loss_before_update()
                _judge = self._judge
            try:
                if not self._want_layer_norms:
                    return take_model_step(*args, **kwargs)
                self._layer_norms = self._read_layer_norms()
                before = self._local_weights()
                result = take_model_step(*args, **kwargs)
                self._update_norms = self._read_update_norms(before)
                return result
            finally:
                _judge = None

        engine._take_model_step = take_model_step_after_reading_gradients
        if engine.optimizer is engine.basic_optimizer:  # fp32 ZeRO-0: DeepSpeed hands our optimiser through bare
            engine.optimizer.guard = self._norm_and_clip
        _let_the_guard_judge_norms()

    # ------------------------------------------------------------------ collectives (all on self.device)
    def all_reduce(self, tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if tensor.device != self.device:
            raise RuntimeError(f"collective on a {tensor.device} tensor; this process group serves {self.device}")
        if dist.get_world_size(group) > 1:
            dist.all_reduce(tensor, op=op, group=group)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (collective): how every rank agrees to stop at the same step.
        One process asks no one, so the loop's per-step stop check costs no host sync there."""
        if dist.get_world_size() == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return self.all_reduce(value, op=dist.ReduceOp.MAX).item() > 0

    # ------------------------------------------------------------------ loss and token accounting
    def objective(self, total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch as the engine back-propagates it, from `total`, the sum of its per-token
        losses (what the model returns given labels).

        `tokens` (default): sum of per-token losses x (micro-batches x dp) / targets in the global batch.
        DeepSpeed divides by the micro-batch count and averages over DP ranks, so the update follows the mean
        over every target token of the global batch, whatever the micro-batch size. `micro_batch_mean`: the
        official code's mean within each micro-batch. Evaluation: the plain sum.
        """
        if self._evaluating:
            return total
        if self.config.train.loss_reduction == "tokens":
            loss = total * self._token_scale
        else:
            loss = total / (labels != IGNORE_INDEX).sum().clamp(min=1)
        if self.fault is not None and self.fault.kind == "loss" and self._step == self.fault.step \
                and self.is_fault_rank:
            loss = loss * math.nan
        return poison_if_nonfinite(loss)

    def train_step(self, step: int, micro_batches: Sequence[Batch], global_targets: int,
                   want_layer_norms: bool = False, batch: int | None = None) -> StepResult:
        """Forward, backward and (unless non-finite, or an outlier the guard vetoes) the update of optimiser step
        `step` on this rank's micro-batches; `global_targets` counts target tokens over the whole global batch (all
        DP ranks); `batch` is the global batch the step reads (the step itself unless a rollback skipped some)."""
        if len(micro_batches) != self.micro_batches:
            raise ValueError(f"expected {self.micro_batches} micro-batches per step, got {len(micro_batches)}")
        self._step = step
        self._token_scale = self.micro_batches * self.layout.dp / max(global_targets, 1)
        self._want_layer_norms, self._layer_norms, self._update_norms = want_layer_norms, {}, {}
        self._vetoed, self._step_loss = False, None
        hook = self._inject_gradient_fault() if self.fault is not None and self.fault.step == step else None
        bad_batch = self.fault is not None and self.fault.kind == "batch" and self.fault.step == (batch or step)
        lrs = self._multiply_lr(BAD_BATCH_LR_FACTOR) if bad_batch else None
        try:
            mean_loss = self._forward_backward_update(micro_batches)
        finally:
            if hook is not None:
                hook.remove()
            if lrs is not None:
                self._restore_lr(*lrs)
        applied = bool(self.engine.was_step_applied())  # DeepSpeed decides that on the host
        norm = self.engine.get_global_grad_norm()  # a device tensor under bf16 and ZeRO-1/2/3, else a float
        if isinstance(norm, torch.Tensor):
            norm = norm.detach()
        if self.guard is not None:
            judged = self.guard.judgement
            if applied and judged is None:  # a DeepSpeed whose optimisers no longer ask is_invalid_grad_norm
                raise RuntimeError("the loss-spike guard was not consulted by the optimiser step: this DeepSpeed "
                                   "version checks gradient norms elsewhere than the pinned 0.19.8 does")
            if self._vetoed:
                norm = judged.grad_norm  # DeepSpeed records inf for a step it skipped; this is the real norm
        return StepResult(loss=mean_loss.detach(), target_tokens=int(global_targets), applied=applied,
                          grad_norm=norm if norm is None or isinstance(norm, torch.Tensor) else float(norm),
                          layer_grad_norms=self._layer_norms if applied else {},
                          layer_update_norms=self._update_norms if applied else {}, outlier=self._vetoed)

    def _multiply_lr(self, factor: float):
        groups = self.engine.basic_optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] *= factor
        return groups, saved, [group["lr"] for group in groups]

    @staticmethod
    def _restore_lr(groups, saved, multiplied) -> None:
        """Undo _multiply_lr unless the LR schedule has set the next step's LR meanwhile (an applied step)."""
        for group, old, bad in zip(groups, saved, multiplied):
            if group["lr"] == bad:
                group["lr"] = old

    # ------------------------------------------------------------------ the loss-spike guard
    def _judge(self, norm) -> bool:
        """Whether the guard vetoes this update, asked where the optimiser checks its gradient norm (first ask of
        the step decides; a later ask in the same step, e.g. ZeRO-1/2's clipping, gets the same answer). The
        norm's host read is the optimiser's own; the loss was computed before the norm, so reading it waits for
        nothing more."""
        if self.guard.judgement is None:
            loss = self._step_loss.detach().double()
            loss, norm = torch.stack([loss, torch.as_tensor(norm).to(loss.device, torch.float64)]).tolist()
            judgement = self.guard.judge(loss, norm)
            self._vetoed = judgement.outlier and self.guard.vetoes
        return self._vetoed

    def _loss_before_update(self) -> torch.Tensor:
        """The global batch's objective as the engine reports it, on every rank, before the update."""
        raise NotImplementedError

    def _forward_backward_update(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Run the step; return the objective averaged as DeepSpeed averages it (over micro-batches and DP)."""
        raise NotImplementedError

    def _inject_gradient_fault(self):
        if self.fault.kind != "grad" or not self.is_fault_rank:
            return None
        param = next(p for p in self.module.parameters() if p.requires_grad)
        return param.register_hook(lambda grad: grad * math.nan)

    # ------------------------------------------------------------------ gradient norms
    def _squared_norms(self, gradients) -> torch.Tensor:
        """[sum of squares per slot] over (slot, gradient) pairs, summed over the model-parallel group (pipeline
        stages and TP ranks of one replica). float64 (`squared_norm`), on the device, no host sync."""
        squares = torch.zeros(len(self.layer_keys), dtype=torch.float64, device=self.device)
        for slot, grad in gradients:
            squares[slot] += squared_norm(grad).to(self.device)
        return self.all_reduce(squares, group=self.layout.model_parallel_group)

    def _counted_gradients(self, read_grad):
        slot = {key: i for i, key in enumerate(self.layer_keys)}
        for name, param in self.module.named_parameters():
            grad = read_grad(param)  # may be a collective (ZeRO-1/2/3): every rank reads every parameter
            if grad is not None and counts_here(param):
                yield slot[layer_norm_key(self.name_of(name))], grad

    def _read_layer_norms(self) -> dict[str, float]:
        from deepspeed.utils import safe_get_full_grad  # the reduced gradient under every ZeRO stage

        squares = self._squared_norms(self._counted_gradients(safe_get_full_grad)).cpu()
        return {key: math.sqrt(value) for key, value in zip(self.layer_keys, squares.tolist())}

    def _counted_local_weights(self):
        """(slot, this rank's share of the weight) for each parameter this rank counts in the model-wide norms:
        the whole tensor, or its ZeRO-3 partition."""
        slot = {key: i for i, key in enumerate(self.layer_keys)}
        for name, param in self.module.named_parameters():
            if counts_here(param):
                yield slot[layer_norm_key(self.name_of(name))], getattr(param, "ds_tensor", param).detach()

    def _local_weights(self) -> list[torch.Tensor]:
        """A host copy of every counted weight share, in its own dtype (no rounding): the GPU holds nothing extra.
        Pageable, not pinned: PyTorch's pinned-memory cache would round each tensor up to a power of two and keep
        it for the rest of the run, where this memory is exactly the weights' size and is freed after the step.
        The copies are synchronous, so each has landed before the update can write its weight."""
        return [weight.to("cpu", copy=True) for _, weight in self._counted_local_weights()]

    def _read_update_norms(self, before: list[torch.Tensor]) -> dict[str, float]:
        """Per-layer L2 norm of what the update changed (how far each layer moved), counted like the
        gradient norms; ZeRO-3 partitions are summed over the data-parallel group. Each weight's change is made
        on the device one tensor at a time from its host copy, so at most one tensor's change is alive."""
        squares = torch.zeros(len(self.layer_keys), dtype=torch.float64, device=self.device)
        for (slot, weight), old in zip(self._counted_local_weights(), before):
            squares[slot] += squared_change(old, weight, self.device)
        self.all_reduce(squares, group=self.layout.model_parallel_group)
        if any(hasattr(p, "ds_tensor") for p in self.module.parameters()):  # ZeRO-3: each DP rank its partition
            self.all_reduce(squares, group=self.layout.dp_group)
        return {key: math.sqrt(value) for key, value in zip(self.layer_keys, squares.cpu().tolist())}

    def _norm_and_clip(self) -> float:
        """GuardedStep's check for the fp32 ZeRO-0 path: the global pre-clip norm of the (DP-averaged)
        gradients; clips them to train.grad_clip when it is finite."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = math.sqrt(self._squared_norms(self._counted_gradients(lambda p: p.grad)).sum().item())
        if math.isfinite(norm) and _judge is not None and _judge(norm):
            return math.inf  # a vetoed outlier takes the non-finite path (GuardedStep skips it)
        if math.isfinite(norm) and self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.train.grad_clip,
                                                 torch.tensor(norm, device=self.device))
        return norm

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def weights_are_finite(self) -> bool:
        """Whether every weight of the model is finite (collective); checked before anything is saved."""
        bad = torch.zeros(1, dtype=torch.float32, device=self.device)
        for param in self.module.parameters():
            local = getattr(param, "ds_tensor", param)  # ZeRO-3: this rank's partition
            bad += (~torch.isfinite(local)).any().to(device=self.device, dtype=torch.float32)
        return self.all_reduce(bad, op=dist.ReduceOp.MAX).item() == 0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset, num_sequences: int) -> EvalResult:
        """Token-weighted held-out loss over a fixed sample spread over the whole split.

        Every DP rank runs the same number of forwards (the last ones padded with zero-weight batches), which
        ZeRO-3's parameter gathers need; every micro-batch has the training shape, which the pipeline needs.
        """
        from megatron_mixln.data.sampling import eval_indices

        indices = eval_indices(len(dataset), num_sequences)
        if len(indices) == 0:
            return EvalResult(loss=None, sequences=0, tokens=0)
        size = self.config.train.micro_batch_size
        chunks = [indices[start:start + size] for start in range(0, len(indices), size)]
        mine, padding = self._dp_share(len(chunks))
        batches = [eval_batch(dataset, chunks[i], size) for i in mine]
        batches += [zero_weight(eval_batch(dataset, chunks[0], size))] * padding
        tokens = int(dataset.target_counts(indices).sum())
        total = self._evaluation_loss_sum(batches)
        return EvalResult(loss=float(total) / tokens if tokens else None, sequences=len(indices), tokens=tokens)

    def _dp_share(self, count: int) -> tuple[list[int], int]:
        """This DP rank's share of `count` evaluation batches (every dp-th one) and how many zero-weight batches it
        adds so that every rank runs the same number of forwards, which ZeRO-3's parameter gathers need."""
        mine = list(range(self.layout.dp_rank, count, self.layout.dp))
        return mine, -(-count // self.layout.dp) - len(mine)

    def _evaluation_loss_sum(self, batches: Sequence[Batch]) -> torch.Tensor:
        """`_loss_sum` with the objective in evaluation mode (the plain sum: no fault, no token scaling)."""
        self._evaluating = True
        try:
            return self._loss_sum(batches)
        finally:
            self._evaluating = False

    def score_rows(self, batches: Sequence[Batch]) -> torch.Tensor:
        """float64 [rows of all `batches`, 2] on the host, identical on every rank: each row's summed target
        log-probability and whether every target is the greedy token (`model.llama.row_scores`), for downstream
        evaluation in the training layout. Every rank passes the same `batches` (each of the training micro-batch's
        shape, as the pipeline needs); DP ranks share them out as `evaluate` does, the heads of the last stage
        record their rows, and one SUM all-reduce hands every row to every rank. Nothing is gathered but the
        layers ZeRO-3 gathers for any forward."""
        from megatron_mixln.model.llama import log_partition_modules

        if not batches:
            return torch.zeros((0, 2), dtype=torch.float64, device="cpu")
        rows = batches[0][0].shape[0]
        mine, padding = self._dp_share(len(batches))
        heads = log_partition_modules(self.module)  # the last stage's head; none on other pipeline stages
        for head in heads:
            head.row_scores = []
        try:
            self._evaluation_loss_sum([batches[i] for i in mine] + [zero_weight(batches[0])] * padding)
            recorded = heads[0].row_scores if heads else []
        finally:
            for head in heads:
                head.row_scores = None
        scores = torch.zeros((len(batches) * rows, 2), dtype=torch.float64, device=self.device)
        if heads and self.tp.rank == 0:  # every TP rank holds the same rows; count them once
            for index, row_block in zip(mine, recorded):  # the padding's blocks come last and are left out
                scores[index * rows:(index + 1) * rows] = row_block.to(self.device)
        return self.all_reduce(scores).cpu()

    def _loss_sum(self, batches: Sequence[Batch]) -> torch.Tensor:
        """Sum of per-token losses over every DP rank's `batches` (identical on every rank)."""
        raise NotImplementedError


class MicroBatchSteps(StepEngine):
    """No pipeline: each micro-batch runs forward and backward through the DeepSpeed engine; the engine
    reduces gradients and updates at the last one."""

    def _forward_backward_update(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, (inputs, labels) in enumerate(micro_batches):
            inputs = inputs.to(self.device, non_blocking=True)  # from pinned memory on a GPU: an async copy
            labels = labels.to(self.device, non_blocking=True)
            loss = self.objective(self.engine(inputs, labels), labels)
            self.engine.backward(loss)
            total += loss.detach().float()
            if index == len(micro_batches) - 1:  # the global loss exists before the update, for the guard
                self._mean_loss = self.all_reduce(total, group=self.layout.dp_group) / (self.micro_batches * self.layout.dp)
            self.engine.step()
        return self._mean_loss

    def _loss_before_update(self) -> torch.Tensor:
        return self._mean_loss

    def _loss_sum(self, batches: Sequence[Batch]) -> torch.Tensor:
        total = loss_sum(self.module, batches, self.device)
        return self.all_reduce(total, group=self.layout.dp_group)


class PipelineSteps(StepEngine):
    """Pipeline parallelism: DeepSpeed's PipelineEngine runs the micro-batches (1F1B) and the update inside
    `train_batch`; this engine's `objective` is the pipeline's loss function."""

    def __init__(self, engine, config: Config, layout, name_of: Callable[[str], str] = lambda name: name):
        from megatron_mixln.model.llama import LMHead

        super().__init__(engine, config, layout, name_of)
        self.module.loss_fn = self._last_stage_loss
        self._head = next((m for m in self.module.modules() if isinstance(m, LMHead)), None)  # last stage only

    def _last_stage_loss(self, normed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pipeline's loss_fn: the last stage hands over the final norm's output (LMHead, project=False),
        and the head's projection runs here, where the labels are (fused with the loss or not)."""
        return self.objective(self._head.lm_head(normed, labels), labels)

    def _forward_backward_update(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        # DeepSpeed's mean over micro-batches and DP ranks, broadcast from the last stage to every stage.
        return self.engine.train_batch(iter(micro_batches)).float()

    def _loss_before_update(self) -> torch.Tensor:
        """DeepSpeed broadcasts the loss after the schedule, the update included; the guard needs it before: the
        last stage's sum over its micro-batches (`total_loss`), as a mean over micro-batches and DP replicas, summed
        over the world from the last stage's TP rank 0 of each replica (one all-reduce of one scalar)."""
        share = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.layout.is_last_stage and self.tp.rank == 0:
            share += self.engine.total_loss.detach().float() / (self.micro_batches * self.layout.dp)
        return self.all_reduce(share)

    def _loss_sum(self, batches: Sequence[Batch]) -> torch.Tensor:
        # eval_batch averages the loss sums over micro-batches and DP ranks and broadcasts it to every stage.
        mean = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
        return mean.float() * (len(batches) * self.layout.dp)


# The guard's judge for the optimiser step under way (StepEngine._judge), or None: DeepSpeed's optimisers ask it
# through their is_invalid_grad_norm check (see _let_the_guard_judge_norms); GuardedStep through _norm_and_clip.
_judge: Callable[[object], bool] | None = None


def _let_the_guard_judge_norms() -> None:
    """Wrap `is_invalid_grad_norm` where DeepSpeed 0.19.8's bf16, ZeRO-1/2 and ZeRO-3 optimisers call it, right
    after computing the global gradient norm and before any update (bf16_optimizer.step, stage_1_and_2.step,
    stage3.step): an outlier the guard vetoes is then an invalid norm, skipped by DeepSpeed's own path. Outside a
    guarded step (`_judge` None) the check is DeepSpeed's alone. Idempotent."""
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    for module in (bf16_optimizer, stage_1_and_2, stage3):
        check = module.is_invalid_grad_norm
        if getattr(check, "asks_the_guard", False):
            continue

        def invalid_or_vetoed(norm, check=check) -> bool:
            return check(norm) or (_judge is not None and _judge(norm))

        invalid_or_vetoed.asks_the_guard = True
        module.is_invalid_grad_norm = invalid_or_vetoed


def squared_change(old: torch.Tensor, new: torch.Tensor, device: torch.device) -> torch.Tensor:
    """||new - old||^2 in fp32 on `device` (`old` a host copy of `new` before the update), as a device scalar.
    The copy goes up in its own dtype (a dtype change inside the copy would widen it on the host first) and is
    widened on the device, where the fp32 difference is made in place. That, one tensor's upload and its fp32
    form, is all the device memory it takes, freed on return. |old - new| is |new - old| exactly."""
    change = old.to(device).float()
    change.sub_(new)  # computed in fp32 whatever new's dtype (type promotion), no rounding before the norm
    return squared_norm(change)


# torch's CPU norm kernel sums a tensor's squares in a few fp32 accumulators, an error that grows with the length:
# -1.2e-4 relative for the 4096 x 128 LM-head gradient of configs/tiny.yaml, -5e-5 from its two halves under TP2,
# so one process and TP2 logged norms 7e-5 apart where the exact ones agree to 1e-8. Rows of NORM_BLOCK elements keep
# each fp32 sum short (1e-7 here); the rows' squares are added in float64.
NORM_BLOCK = 4096


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """||tensor||^2 as a float64 scalar on the tensor's device, accurate to fp32 rounding at any size, without a
    float64 copy of the tensor."""
    flat = tensor.detach().reshape(-1)
    whole = flat.numel() - flat.numel() % NORM_BLOCK
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_BLOCK), dim=1, dtype=torch.float32)
    rest = torch.linalg.vector_norm(flat[whole:], dtype=torch.float32)
    return rows.double().square().sum() + rest.double().square()


def make_step_engine(engine, config: Config, layout) -> StepEngine:
    if layout.pp > 1:
        from megatron_mixln.model.stages import consolidated_name

        return PipelineSteps(engine, config, layout,
                             name_of=lambda local: consolidated_name(local, config.model.num_layers))
    return MicroBatchSteps(engine, config, layout)


@torch.no_grad()
def loss_sum(module: torch.nn.Module, batches, device: torch.device) -> torch.Tensor:
    """Sum of per-token losses of `module` (in eval mode meanwhile) over `batches`, as a device scalar."""
    was_training = module.training
    module.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    try:
        for inputs, labels in batches:
            total += module(inputs.to(device), labels.to(device))
    finally:
        module.train(was_training)
    return total


def eval_batch(dataset, indices, rows: int) -> Batch:
    """Sequences `indices` as one batch of exactly `rows` rows (padding rows have no targets)."""
    from megatron_mixln.data.sampling import collate

    inputs, labels = collate(dataset, indices)
    missing = rows - inputs.shape[0]
    if missing > 0:
        inputs = torch.cat([inputs, inputs[:1].expand(missing, -1)])
        labels = torch.cat([labels, torch.full((missing, labels.shape[1]), IGNORE_INDEX, dtype=labels.dtype,
                                               device=labels.device)])
    return inputs, labels


def zero_weight(batch: Batch) -> Batch:
    """A batch with the same shape and no target: it runs the same forward and adds nothing."""
    inputs, labels = batch
    return inputs, torch.full_like(labels, IGNORE_INDEX)
