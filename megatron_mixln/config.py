"""Typed run configuration: dataclasses per section, YAML loading, `section.field=value` overrides, validation.

Every user mistake ends in one `ConfigError` sentence naming the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NORM_PLACEMENTS = ("pre", "post", "mix", "deepnorm", "sandwich", "lns", "peri", "hybrid", "hybrid_star")
KERNEL_CHOICES = ("auto", "triton", "torch", "apex")
LOSS_REDUCTIONS = ("tokens", "micro_batch_mean")
DATA_FORMATS = ("text", "instruction", "chat")


class ConfigError(ValueError):
    """A configuration value a user can fix; the message is one sentence naming field, value and what is valid."""


@dataclass
class ModelConfig:
    """A LLaMA decoder and its normalisation placement (docs/method.md)."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1368
    num_layers: int = 12
    num_heads: int = 8
    norm_placement: str = "pre"
    mix_alpha: float = 0.25
    post_layers: int | None = None  # Mix-LN: explicit Post-LN layer count, overrides mix_alpha
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    init_std: float = 0.02
    scaled_init: bool = False  # std init_std/sqrt(2L) on o_proj and down_proj (paper Table 8)
    scaled_embed_init: bool = False  # embedding std sqrt(2/5) (paper Table 8)
    kernels: str = "auto"  # auto | triton | torch | apex
    # The LM head's projection and the loss chunked over tokens, never holding the whole [tokens x vocab]
    # logits (model/linear_cross_entropy.py). Changes memory and speed, not the model.
    fused_cross_entropy: bool = False
    # Start from these weights instead of the seeded initialisation (a fresh run only): a Hugging Face LLaMA
    # folder, one of our HF exports or a consolidated export of the same model (train/init_from.py).
    init_from: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_seq_len"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "a positive integer")
        _require(self.norm_placement in NORM_PLACEMENTS, f"{prefix}.norm_placement", self.norm_placement,
                 "one of " + ", ".join(NORM_PLACEMENTS))
        _require(0.0 <= self.mix_alpha <= 1.0, f"{prefix}.mix_alpha", self.mix_alpha, "a number in [0, 1]")
        if self.post_layers is not None:
            _require(0 <= self.post_layers <= self.num_layers, f"{prefix}.post_layers", self.post_layers,
                     f"an integer in [0, num_layers={self.num_layers}] or null")
        _require(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads", self.num_heads,
                 f"a divisor of hidden_size={self.hidden_size}")
        _require(self.head_dim % 2 == 0, f"{prefix}.num_heads", self.num_heads,
                 f"a value giving an even head dimension for rotary embeddings (hidden_size={self.hidden_size})")
        _require(self.rms_norm_eps > 0, f"{prefix}.rms_norm_eps", self.rms_norm_eps, "a positive number")
        _require(self.rope_theta > 0, f"{prefix}.rope_theta", self.rope_theta, "a positive number")
        _require(self.init_std > 0, f"{prefix}.init_std", self.init_std, "a positive number")
        _require(self.kernels in KERNEL_CHOICES, f"{prefix}.kernels", self.kernels, "one of " + ", ".join(KERNEL_CHOICES))


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenised, and how it becomes fixed-length sequences."""

    # "c4" (allenai/c4 en through datasets streaming), "hf:NAME[:CONFIG]", "embedded" (the shipped
    # Wikipedia sample), or a path to a .txt / .jsonl / .json (optionally .gz) file or a folder of them.
    source: str = "c4"
    text_field: str = "text"
    # HF tokenizer name or folder ("t5-base"), a SentencePiece .model file, a tokenizer.json,
    # or "bpe" to train a byte-level BPE of bpe_vocab_size on the training text.
    tokenizer: str = "t5-base"
    bpe_vocab_size: int = 8192
    seq_len: int = 256
    mode: str = "document"  # "document": one document per sequence, padded (paper); "packed"
    eval_fraction: float = 0.01  # documents held out from local sources (C4 uses its validation split)
    # 0 = what the run reads (train.steps x train.global_batch_size documents, or as many tokens in packed mode),
    # so a C4 run tokenises only that; -1 = the whole source; N > 0 = the first N documents.
    max_train_documents: int = 0
    max_eval_documents: int = 0  # 0 = all
    cache_dir: str = ".cache/mixln"
    num_proc: int = 0  # tokenising processes; 0 = one per CPU core, at most one per shard and 32
    # true: cache_dir is on a file system every node sees and global rank 0 prepares; false: each node has its
    # own cache_dir and local rank 0 of each node prepares.
    cache_shared: bool = True
    # What a record is (docs/data.md#instruction-and-chat-data): "text" (pre-training documents); "instruction"
    # (Alpaca / Commonsense170K records: instruction, optional input, output) or "chat" (a list of role/content
    # messages), both trained on the response only: the prompt's tokens carry no target.
    format: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"  # optional in each record; an empty or absent input takes the no-input prompt
    output_field: str = "output"
    messages_field: str = "messages"
    # format=instruction: "alpaca" (Alpaca's standard prompt, with and without input, as the Commonsense170K
    # fine-tuning code uses) or a template with {instruction} (and optionally {input}) that ends where the
    # response starts.
    prompt_template: str = "alpaca"

    def validate(self, prefix: str = "data") -> None:
        _require(bool(self.source), f"{prefix}.source", self.source, "a dataset name or a path")
        _require(self.format in DATA_FORMATS, f"{prefix}.format", self.format, "one of " + ", ".join(DATA_FORMATS))
        for name in ("instruction_field", "input_field", "output_field", "messages_field"):
            _require(bool(getattr(self, name)), f"{prefix}.{name}", getattr(self, name), "a record field name")
        _require(self.prompt_template == "alpaca" or _is_prompt_template(self.prompt_template),
                 f"{prefix}.prompt_template", self.prompt_template,
                 "alpaca or a template holding {instruction}, optionally {input}, and no other {field}")
        _require(self.mode in ("document", "packed"), f"{prefix}.mode", self.mode, "one of document, packed")
        _require(self.seq_len >= 2, f"{prefix}.seq_len", self.seq_len, "an integer >= 2")
        _require(0.0 <= self.eval_fraction < 1.0, f"{prefix}.eval_fraction", self.eval_fraction, "a number in [0, 1)")
        _require(self.bpe_vocab_size >= 260, f"{prefix}.bpe_vocab_size", self.bpe_vocab_size, "an integer >= 260")
        _require(self.max_train_documents >= -1, f"{prefix}.max_train_documents", self.max_train_documents,
                 "-1 (the whole source), 0 (what the run reads) or a positive integer")
        _require(self.max_eval_documents >= 0, f"{prefix}.max_eval_documents", self.max_eval_documents,
                 "0 (all) or a positive integer")
        _require(self.num_proc >= 0, f"{prefix}.num_proc", self.num_proc, "0 (one per CPU core) or a positive integer")


@dataclass
class TrainConfig:
    """Optimiser, schedule, precision, logging and checkpointing of one run."""

    steps: int = 1000
    global_batch_size: int = 512  # sequences per optimiser step, over all data-parallel ranks
    micro_batch_size: int = 16  # sequences per forward pass on one rank
    optimizer: str = "adam"  # adam | adamw | sgd (plain SGD: for equivalence tests, the update follows the gradient)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_fraction: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off (the official scripts); the paper's README uses 1.0
    precision: str = "fp32"  # fp32 | bf16 (bf16 keeps fp32 master weights)
    seed: int = 42  # in [0, 2**63): the data order and every parameter's initialisation follow it
    out_dir: str = "runs/default"
    log_every: int = 1
    layer_grad_norm_every: int = 50  # per-layer gradient norms into metrics.jsonl; 0 = never
    # Stability telemetry every N steps (and on every guard event): per-layer activation RMS and max of the residual
    # stream, update-to-weight ratio, max attention logit, the output log-partition (docs/stability.md); 0 = never.
    telemetry_every: int = 0
    # PaLM's auxiliary z-loss: z_loss * mean(log Z)^2 over target tokens, Z the softmax normaliser; 0 = off.
    z_loss: float = 0.0
    eval_every: int = 0  # 0 = only at the end
    eval_sequences: int = 256
    # lm-evaluation-harness tasks scored during training in the run's own layout (docs/evaluation.md): registry names
    # or task YAML paths, comma-separated; "" = none. Every downstream_every steps (0 = only at the end), on at most
    # downstream_limit documents per task (0 = all), with downstream_num_fewshot examples in each prompt.
    downstream_tasks: str = ""
    downstream_every: int = 0
    downstream_limit: int = 0
    downstream_num_fewshot: int = 0
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint in out_dir, if any) | none | a checkpoint folder
    # On resume, a changed schedule or optimiser field (lr, betas, steps, ...) stops the run unless "allow", which
    # carries the new values on (printed; the LR schedule then follows them). Model and data changes always stop.
    resume_changes: str = "refuse"  # refuse | allow
    stop_after_step: int = 0  # stop (after saving) once this step is done; 0 = never
    # A step whose loss or gradient is not finite never updates the weights: "stop" then ends the run, "skip"
    # goes on with the next step (the LR schedule advances with applied updates only).
    on_nonfinite: str = "stop"  # stop | skip
    max_consecutive_skips: int = 10  # with skip: stop once this many updates in a row were skipped
    # "tokens": every target token of the global batch weighs the same (the gradient does not depend on
    # micro_batch_size); "micro_batch_mean": the official code's mean of per-micro-batch mean losses.
    loss_reduction: str = "tokens"
    tensorboard: bool = True  # <out_dir>/tensorboard, through DeepSpeed's monitor
    wandb: bool = False  # Weights & Biases through DeepSpeed's monitor (pip install 'megatron_mixln[wandb]')
    wandb_project: str = "megatron_mixln"
    progress_bar: bool = True  # a bar on a terminal; one plain line per train.log_every steps otherwise
    # torch.compile (inductor) of each decoder layer's forward; the Triton kernels are custom ops inside it
    # (docs/performance.md). The first steps pay the compilation.
    compile: bool = False

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_every"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "a positive integer")
        for name in ("layer_grad_norm_every", "telemetry_every", "eval_every", "save_every", "stop_after_step", "eval_sequences",
                     "downstream_every", "downstream_limit", "downstream_num_fewshot"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "0 or a positive integer")
        _require(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", self.keep_checkpoints, "a positive integer")
        _require(self.optimizer in ("adam", "adamw", "sgd"), f"{prefix}.optimizer", self.optimizer,
                 "one of adam, adamw, sgd")
        _require(self.lr > 0, f"{prefix}.lr", self.lr, "a positive number")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _require(0.0 <= self.warmup_fraction < 1.0, f"{prefix}.warmup_fraction", self.warmup_fraction, "a number in [0, 1)")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{prefix}.betas", self.betas,
                 "two numbers in [0, 1)")
        _require(self.adam_eps > 0, f"{prefix}.adam_eps", self.adam_eps, "a positive number")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.z_loss >= 0, f"{prefix}.z_loss", self.z_loss, "a number >= 0 (0 = off)")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        _require(self.precision in ("fp32", "bf16"), f"{prefix}.precision", self.precision, "one of fp32, bf16")
        _require(self.on_nonfinite in ("stop", "skip"), f"{prefix}.on_nonfinite", self.on_nonfinite, "one of stop, skip")
        _require(self.max_consecutive_skips >= 1, f"{prefix}.max_consecutive_skips", self.max_consecutive_skips,
                 "a positive integer")
        _require(self.loss_reduction in LOSS_REDUCTIONS, f"{prefix}.loss_reduction", self.loss_reduction,
                 "one of " + ", ".join(LOSS_REDUCTIONS))
        _require(self.resume_changes in ("refuse", "allow"), f"{prefix}.resume_changes", self.resume_changes,
                 "one of refuse, allow")
        _require(bool(self.out_dir), f"{prefix}.out_dir", self.out_dir, "a folder path")
        # numpy's generators refuse a negative seed, and weight initialisation tells seeds apart modulo 2**63
        # (model/llama.py, parameter_seed), so a larger one would repeat a smaller one's weights.
        _require(0 <= self.seed < 2**63, f"{prefix}.seed", self.seed, "an integer in [0, 2**63)")


GUARD_ACTIONS = ("off", "warn", "skip", "rollback")


@dataclass
class GuardConfig:
    """The loss-spike guard (docs/stability.md): each step's loss and global gradient norm against a rolling window
    of recent applied steps, and what to do with an outlier or a collapse."""

    action: str = "off"  # off | warn (record) | skip (do not apply the step) | rollback (skip; reload when that fails)
    window: int = 50  # applied steps the mean and standard deviation are taken over
    sigmas: float = 6.0  # an outlier lies more than this many standard deviations above the window's mean
    # ... and more than this fraction above it: a window of near-equal values (a steady gradient norm) has a tiny
    # standard deviation, which would make ordinary noise an outlier.
    min_rise: float = 0.1
    warmup_steps: int = 50  # no step is judged before this many applied steps (the early loss falls too fast)
    loss_ceiling: float = 0.0  # a loss above it is an outlier whatever the window says; 0 = none
    grad_norm_ceiling: float = 0.0  # the same for the gradient norm; 0 = none
    # rollback: reload once `rollback_outliers` outliers fall within `rollback_within` steps, once the loss stays
    # above the window's mean for `rollback_within` steps in a row, or on a collapse.
    rollback_outliers: int = 3
    rollback_within: int = 20
    # The global batches skipped after a rollback: those of the trouble (first outlier to the rollback) and this
    # many before it. The checkpoint reloaded is the newest one before them.
    skip_batches_before: int = 10
    lr_factor: float = 1.0  # after a rollback the LR is multiplied by this for `lr_factor_steps` updates
    lr_factor_steps: int = 0
    max_rollbacks: int = 3  # past it the run stops with a clear message
    # A collapse: a gradient norm of exactly 0, or a loss within `collapse_tolerance` nats of the uniform
    # (ln vocab) or unigram level after it had been lower, for `collapse_steps` steps in a row.
    collapse_steps: int = 10
    collapse_tolerance: float = 0.05

    def validate(self, prefix: str = "guard") -> None:
        _require(self.action in GUARD_ACTIONS, f"{prefix}.action", self.action, "one of " + ", ".join(GUARD_ACTIONS))
        for name in ("window", "rollback_outliers", "rollback_within", "max_rollbacks", "collapse_steps"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "a positive integer")
        _require(self.window >= 2, f"{prefix}.window", self.window, "at least 2 (a standard deviation needs two)")
        for name in ("warmup_steps", "skip_batches_before", "lr_factor_steps"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "0 or a positive integer")
        for name in ("loss_ceiling", "grad_norm_ceiling", "collapse_tolerance", "min_rise"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "a number >= 0 (0 = none)")
        _require(self.sigmas > 0, f"{prefix}.sigmas", self.sigmas, "a positive number")
        _require(0 < self.lr_factor <= 1, f"{prefix}.lr_factor", self.lr_factor, "a number in (0, 1]")


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallelism is whatever the world size leaves: dp = world_size / (tp * pp).

    Supported (docs/parallelism.md): pp=1 with any tp and ZeRO 0-3; pp>1 with any tp and ZeRO 0-1 (DeepSpeed's pipeline
    engine has no ZeRO-2/3).
    """

    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    offload_optimizer: bool = False  # ZeRO optimiser states (and the Adam step) on the CPU
    # Pipeline partition: "parameters" (balance parameter counts, embedding and head included), "uniform",
    # or explicit stage boundaries over the layer specs [embedding, layer 0..L-1, final norm + head],
    # e.g. "0,7,14" for two stages of a 12-layer model.
    pipeline_partition: str = "parameters"
    # How long ranks wait for each other at start-up (each says who is missing) before stopping with exit 2;
    # also torch.distributed's timeout for every collective, so keep it above the longest checkpoint save.
    startup_timeout_minutes: float = 10.0

    def validate(self, prefix: str = "parallel") -> None:
        _require(self.tp >= 1, f"{prefix}.tp", self.tp, "a positive integer")
        _require(self.pp >= 1, f"{prefix}.pp", self.pp, "a positive integer")
        _require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        if self.pp > 1:
            _require(self.zero_stage <= 1, f"{prefix}.zero_stage", self.zero_stage,
                     f"0 or 1 with parallel.pp={self.pp} (DeepSpeed's pipeline engine supports ZeRO stage 0-1 only; "
                     "ZeRO-2/3 need pp=1)")
        _require(not self.offload_optimizer or self.zero_stage >= 1, f"{prefix}.offload_optimizer",
                 self.offload_optimizer, "false unless parallel.zero_stage is 1, 2 or 3 (offload is a ZeRO feature)")
        _require(0 < self.startup_timeout_minutes <= 7 * 24 * 60, f"{prefix}.startup_timeout_minutes",
                 self.startup_timeout_minutes, "a positive number of minutes, at most a week")
        if self.pipeline_partition not in ("parameters", "uniform"):
            bounds = self.pipeline_boundaries()
            _require(bounds is not None and len(bounds) == self.pp + 1 and bounds[0] == 0
                     and all(a < b for a, b in zip(bounds, bounds[1:])),
                     f"{prefix}.pipeline_partition", self.pipeline_partition,
                     f"parameters, uniform, or {self.pp + 1} increasing comma-separated layer-spec boundaries "
                     "starting at 0")

    def pipeline_boundaries(self) -> list[int] | None:
        """Explicit stage boundaries when pipeline_partition lists them, else None."""
        try:
            return [int(part) for part in self.pipeline_partition.split(",")]
        except ValueError:
            return None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        self.guard.validate()
        _require(self.guard.action != "rollback" or self.train.save_every > 0, "guard.action", self.guard.action,
                 "off, warn or skip with train.save_every=0 (a rollback reloads a checkpoint: set train.save_every)")
        _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len", self.data.seq_len,
                 f"at most model.max_seq_len={self.model.max_seq_len}")
        tp, m = self.parallel.tp, self.model
        for name in ("num_heads", "intermediate_size", "vocab_size"):
            _require(getattr(m, name) % tp == 0, f"model.{name}", getattr(m, name),
                     f"a multiple of parallel.tp={tp} (tensor parallelism splits it evenly)")
        bounds = self.parallel.pipeline_boundaries()
        if bounds is not None:
            _require(bounds[-1] == m.num_layers + 2, "parallel.pipeline_partition", self.parallel.pipeline_partition,
                     f"boundaries ending at {m.num_layers + 2} (embedding + {m.num_layers} layers + final norm/head)")
        _require(self.parallel.pp <= m.num_layers + 2, "parallel.pp", self.parallel.pp,
                 f"at most {m.num_layers + 2} stages for {m.num_layers} layers plus embedding and head")
        # DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 only in its BF16 / ZeRO optimisers; at ZeRO-0 it
        # would accumulate (and all-reduce) them in bf16. ZeRO-1 keeps every rank's full model and gradients.
        _require(self.train.precision != "bf16" or self.parallel.zero_stage >= 1, "parallel.zero_stage",
                 self.parallel.zero_stage, "1, 2 or 3 with train.precision=bf16 (fp32 gradient accumulation and "
                 "master weights live in DeepSpeed's ZeRO optimisers; ZeRO-1 partitions only optimiser states)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig,
            "guard": GuardConfig}


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {allowed}.")


def _is_prompt_template(template: str) -> bool:
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:  # an unmatched brace
        return False
    return "instruction" in fields and fields <= {"instruction", "input"}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}={value!r} is invalid: expected a list of {len(args)} numbers.")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name}={value!r} is invalid: expected true or false.")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid: expected an integer.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = math.nan
                if as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer.")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid: expected a number.")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{name}={value!r} is invalid: expected a finite number.")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r} is invalid: expected a string.")
    raise TypeError(f"unsupported config annotation {annotation!r} for {name}")


def _section_from_dict(cls: type, values: dict[str, Any], section: str) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"{section}.{key} is not a known field: valid fields of {section} are "
                              + ", ".join(types_) + ".")
        kwargs[key] = _coerce(value, types_[key], f"{section}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from nested dicts (unknown sections and fields are errors)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}.")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name} is not a known config section: valid sections are {', '.join(SECTIONS)}.")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of fields, got {value!r}.")
        sections[name] = _section_from_dict(SECTIONS[name], value, name)
    return Config(**sections).validate()


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["model.num_layers=4", ...] into {"model": {"num_layers": "4"}} (values stay strings, coerced later)."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} is invalid: expected section.field=value, e.g. train.steps=100.")
        nested.setdefault(section, {})[name] = value
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error: PyYAML keeps the last value
    silently, so a second `train:` section would replace the whole first one."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are allowed to overlap
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = first_lines.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                first_lines.setdefault(key, line)
                if first is not None:
                    raise ConfigError(f"config file {self.name!r} repeats the key {key!r} at line {line} (first at "
                                      f"line {first}), and the second would silently replace the first: merge them into one.")
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """A config file's YAML, or one ConfigError sentence naming the file: not UTF-8, not YAML, a repeated key."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                          f"offset {err.start}): save it as UTF-8.") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data() or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}.") from None
    finally:
        loader.dispose()


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply key=value overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: pass a YAML file such as configs/tiny.yaml.")
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must be a YAML mapping with sections {', '.join(SECTIONS)}.")
    for section, values in parse_overrides(list(overrides)).items():
        if section not in SECTIONS:
            raise ConfigError(f"{section} is not a known config section: valid sections are {', '.join(SECTIONS)}.")
        current = raw.get(section) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"{section} must be a mapping of fields, got {current!r}.")
        raw[section] = {**current, **values}
    return config_from_dict(raw, source=str(path) if path else "config")


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """A validated ModelConfig from a plain dict (exported checkpoints' config.json)."""
    config = _section_from_dict(ModelConfig, values, "model")
    config.validate()
    return config
