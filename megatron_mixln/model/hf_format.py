"""The Hugging Face format of our model, both ways (docs/method.md#hugging-face-interop); it knows the model and its
config, never a run, a checkpoint or an export (those are train/; the commands that convert between them and a
transformers folder are megatron_mixln/hf_interop.py).

Out (`to_hf_model`, `save_hf_pretrained`): a Pre-LN model *is* a `transformers.LlamaForCausalLM` (same names,
same maths) and is written as one. Every other placement is written with the modeling files of `hf_modeling/`,
which the folder carries and names in its config.json `auto_map` (`trust_remote_code=True`); their parameter names
are ours, so the weights are saved as they are.

In (`read_hf_config`, `HFTensors`, `source_names`): a transformers LLaMA folder (or one of our own HF exports) as
our ModelConfig and its tensors under our names, read lazily one slice at a time. The names are the same on both
sides, so no tensor is renamed; a tied LM head is read from the embedding.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

from megatron_mixln.config import ConfigError, ModelConfig
from megatron_mixln.output_folder import OutputKind, atomic_folder
from megatron_mixln.saved_files import CheckpointError, read_json

HF_MODELING = Path(__file__).with_name("hf_modeling")
MODELING_FILES = ("configuration_mixln.py", "modeling_mixln.py")
MODEL_TYPE = "mixln_llama"  # config.json model_type of a non-Pre-LN export
AUTO_MAP = {"AutoConfig": "configuration_mixln.MixLNLlamaConfig",
            "AutoModelForCausalLM": "modeling_mixln.MixLNLlamaForCausalLM"}
# What must agree between a run and the weights it starts from. The shape fields make the tensors fit; rope_theta
# and rms_norm_eps change the function the same tensors compute, so a silent mismatch would start from a
# different model than the one named.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
FUNCTION_FIELDS = ("norm_placement", "rms_norm_eps", "rope_theta")
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # older LLaMA checkpoints save RoPE's buffer; we compute it
RUN_RECORD = "mixln_run"  # config.json key of an --hf export: the step, data metadata and run config


def _holds_run_record(folder: Path) -> bool:
    """Whether config.json is an --hf export's: a model downloaded from the hub has the same two files."""
    try:
        return RUN_RECORD in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


HF_OUTPUT = OutputKind("Hugging Face export", (("config.json", "generation_config.json"),), _holds_run_record)


# ------------------------------------------------------------------------------------------------
# Out: our weights -> a transformers folder
# ------------------------------------------------------------------------------------------------
def _token_ids(data_meta: dict | None) -> dict[str, Any]:
    """Special token ids for the HF config (generation stops at eos): the run's, never LLaMA's defaults 1 and 2."""
    meta = data_meta or {}
    return {"bos_token_id": None, "eos_token_id": meta.get("eos_id"), "pad_token_id": meta.get("pad_id")}


def hf_llama_config(config: ModelConfig, data_meta: dict | None = None):
    """The `transformers.LlamaConfig` of the same architecture (untied head, no biases, SDPA attention)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, rope_theta=config.rope_theta, initializer_range=config.init_std, **_token_ids(data_meta))
    hf_config._attn_implementation = "sdpa"
    return hf_config


def mixln_hf_config(config: ModelConfig, data_meta: dict | None = None):
    """The config of the shipped modeling file (`hf_modeling/configuration_mixln.py`) for any placement."""
    from megatron_mixln.model.hf_modeling.configuration_mixln import MixLNLlamaConfig
    from megatron_mixln.model.norms import norm_placement

    placements = [norm_placement(i, config.num_layers, config) for i in range(config.num_layers)]
    # Every ModelConfig field rides along, so an import gives back the same config (initialisation switches too).
    ours = {key: value for key, value in vars(config).items() if key not in ("kernels", "init_from")}
    hf_config = MixLNLlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        norm_placement=config.norm_placement, mix_alpha=config.mix_alpha, post_layers=config.post_layers,
        layer_placements=placements, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len, initializer_range=config.init_std, mixln_model=ours,
        **_token_ids(data_meta))
    hf_config.auto_map = dict(AUTO_MAP)
    return hf_config


def to_hf_llama(config: ModelConfig, state_dict):
    """A `transformers.LlamaForCausalLM` holding these weights; only Pre-LN has an HF LLaMA equivalent."""
    import transformers

    if config.norm_placement != "pre":
        raise ConfigError(f"model.norm_placement={config.norm_placement!r} has no transformers LLaMA equivalent: "
                          "only pre is a LlamaForCausalLM (to_hf_model gives the shipped modeling file's model).")
    model = transformers.LlamaForCausalLM(hf_llama_config(config))
    model.load_state_dict(state_dict, strict=True)
    return model


def to_hf_model(config: ModelConfig, state_dict, data_meta: dict | None = None, meta_device: bool = False):
    """The transformers model of these weights: LlamaForCausalLM for Pre-LN, the shipped modeling file's
    MixLNLlamaForCausalLM otherwise. `meta_device`: the tensors are taken as they are (no copy, no throw-away
    initialisation); enough to save it, not to run a LlamaForCausalLM (its RoPE buffer stays unset)."""
    import torch
    import transformers

    if config.norm_placement == "pre":
        cls, hf_config = transformers.LlamaForCausalLM, hf_llama_config(config, data_meta)
    else:
        from megatron_mixln.model.hf_modeling.modeling_mixln import MixLNLlamaForCausalLM

        cls, hf_config = MixLNLlamaForCausalLM, mixln_hf_config(config, data_meta)
    if not meta_device:
        model = cls(hf_config)
        model.load_state_dict(state_dict, strict=True)
        return model
    with torch.device("meta"):
        model = cls(hf_config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    dtypes = {tensor.dtype for tensor in state_dict.values()}
    if len(dtypes) == 1:
        model.config.dtype = next(iter(dtypes))  # recorded in config.json, as save_pretrained does
    return model


def save_hf_pretrained(config: ModelConfig, state_dict, out, tokenizer=None, data_meta: dict | None = None,
                       step: int | None = None, run_config: dict | None = None, force: bool = False) -> Path:
    """Write a transformers folder, atomically: a Pre-LN model as LlamaForCausalLM, any other placement with the
    shipped modeling files (loaded with trust_remote_code=True); with `tokenizer` (a transformers tokenizer) also
    its files, so AutoTokenizer.from_pretrained(out) works. config.json keeps the run's record under RUN_RECORD
    (what a consolidated export keeps besides the weights), so mixln-eval finds the run's held-out data. An `out`
    that is not an earlier Hugging Face export is replaced only with `force`."""
    model = to_hf_model(config, state_dict, data_meta, meta_device=True)
    setattr(model.config, RUN_RECORD, {"step": step, "data": data_meta, "run_config": run_config})
    with atomic_folder(out, HF_OUTPUT, force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if config.norm_placement != "pre":
            for name in MODELING_FILES:
                shutil.copyfile(HF_MODELING / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)


# ------------------------------------------------------------------------------------------------
# In: a transformers folder -> our names, shapes and config
# ------------------------------------------------------------------------------------------------


def read_hf_config(folder: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, kind) of a transformers folder: kind "llama" (LlamaForCausalLM) or MODEL_TYPE (our own HF
    export). Never runs code from the folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder or an export: it has no config.json.")
    raw = read_json(folder / "config.json", "copy the folder again")  # not UTF-8 or not JSON: one sentence naming it
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "llama":
        return _llama_model_config(folder), "llama"
    if model_type == MODEL_TYPE:
        return _mixln_model_config(folder), MODEL_TYPE
    raise ConfigError(f"{folder} holds a model_type={model_type!r} model, not a LLaMA: only 'llama' "
                      f"(LlamaForCausalLM) and {MODEL_TYPE!r} (mixln-export --hf) folders can be imported.")


def is_hf_folder(folder: Path) -> bool:
    """A transformers model folder: its config.json names a model_type (an export's and a run folder's do not)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # no file, not JSON, not UTF-8
        return False
    return isinstance(raw, dict) and "model_type" in raw


def _llama_model_config(folder: Path) -> ModelConfig:
    import transformers

    hf = transformers.LlamaConfig.from_pretrained(str(folder))
    heads = hf.num_attention_heads
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not rope and getattr(hf, "rope_scaling", None):  # transformers 4
        rope_type = hf.rope_scaling.get("rope_type", hf.rope_scaling.get("type"))
    problems = []
    if (hf.num_key_value_heads or heads) != heads:
        problems.append(f"grouped-query attention (num_key_value_heads={hf.num_key_value_heads}, "
                        f"num_attention_heads={heads})")
    if getattr(hf, "head_dim", None) not in (None, hf.hidden_size // heads):
        problems.append(f"head_dim={hf.head_dim} (not hidden_size / num_attention_heads)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        problems.append("bias terms (attention_bias / mlp_bias)")
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act={hf.hidden_act!r}")
    if rope_type not in (None, "default"):
        problems.append(f"RoPE scaling {rope_type!r}")
    if problems:
        raise ConfigError(f"{folder} is a LLaMA this stack cannot represent: it uses {', '.join(problems)}, where "
                          "this model has multi-head attention without biases, SwiGLU and plain RoPE.")
    config = ModelConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                         num_layers=hf.num_hidden_layers, num_heads=heads, norm_placement="pre",
                         rms_norm_eps=hf.rms_norm_eps, rope_theta=float(rope_theta or 10000.0),
                         max_seq_len=hf.max_position_embeddings, init_std=hf.initializer_range)
    config.validate(prefix=f"{folder}: model")
    return config


def _mixln_model_config(folder: Path) -> ModelConfig:
    from megatron_mixln.model.hf_modeling.configuration_mixln import MixLNLlamaConfig

    hf = MixLNLlamaConfig.from_pretrained(str(folder))  # our own class from our package, not the folder's file
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    extra = {key: value for key, value in (getattr(hf, "mixln_model", None) or {}).items() if key in known}
    config = ModelConfig(**{**extra, "vocab_size": hf.vocab_size, "hidden_size": hf.hidden_size,
                            "intermediate_size": hf.intermediate_size, "num_layers": hf.num_hidden_layers,
                            "num_heads": hf.num_attention_heads, "norm_placement": hf.norm_placement,
                            "mix_alpha": hf.mix_alpha, "post_layers": hf.post_layers, "rms_norm_eps": hf.rms_norm_eps,
                            "rope_theta": hf.rope_theta, "max_seq_len": hf.max_position_embeddings,
                            "kernels": "auto", "init_from": None})
    config.validate(prefix=f"{folder}: model")
    return config


class _TensorPiece:
    """A loaded tensor behind safetensors' slice interface (get_shape, indexing), for `_tp_slice`."""

    def __init__(self, tensor):
        self.tensor = tensor

    def get_shape(self):
        return list(self.tensor.shape)

    def __getitem__(self, index):
        return self.tensor[index]


class HFTensors:
    """The tensors of a transformers folder by name, read lazily: safetensors (one file or shards with their
    index) as slices, or pytorch_model.bin memory-mapped with weights_only=True (never unpickling code)."""

    def __init__(self, folder: str | Path):
        import torch
        from safetensors import safe_open
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

        self.folder = folder = Path(folder)
        self.where: dict[str, Any] = {}
        for index_name, single in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)):
            if (folder / index_name).is_file():
                files = sorted(set(read_json(folder / index_name, "copy the folder again")["weight_map"].values()))
            elif (folder / single).is_file():
                files = [single]
            else:
                continue
            for file in files:
                path = folder / file
                if Path(file).name != file or not path.is_file():
                    raise CheckpointError(f"{folder / index_name} lists {file}, which is not in {folder}: the "
                                            "folder is incomplete.")
                if file.endswith(".safetensors"):
                    handle = safe_open(str(path), framework="pt")
                    self.where.update({name: (handle, name) for name in handle.keys()})
                else:
                    try:
                        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    except Exception as err:  # noqa: BLE001 - torch raises several types for a foreign file
                        # A refused class: torch's message would advise weights_only=False, which runs its code.
                        reason = ("it holds a class outside the allow-list of tensors" if
                                  isinstance(err, pickle.UnpicklingError) else err)
                        raise CheckpointError(f"{path} cannot be read with weights_only=True ({reason}).") from None
                    self.where.update({name: (None, tensor) for name, tensor in state.items()})
            return
        raise CheckpointError(f"{folder} holds no weights: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} "
                                f"with its shards, or {WEIGHTS_NAME}.")

    def piece(self, name: str):
        handle, key = self.where[name]
        return handle.get_slice(key) if handle is not None else _TensorPiece(key)


def _ties_head(folder: Path, kind: str) -> bool:
    """Whether the folder's LM head is its embedding (tie_word_embeddings, as transformers resolves the default)."""
    if kind != "llama":
        return False  # our exports are untied
    import transformers

    return bool(transformers.LlamaConfig.from_pretrained(str(folder)).tie_word_embeddings)


def source_names(tensors: HFTensors, model_config: ModelConfig, folder: Path, kind: str) -> dict[str, str]:
    """Our consolidated name -> the folder's tensor name: the same name, except a tied LM head, which is the
    embedding. Refuses (one sentence) a folder missing a tensor or holding one this model has no place for."""
    import torch

    from megatron_mixln.model.llama import MixLNForCausalLM

    with torch.device("meta"):
        expected = dict(MixLNForCausalLM(dataclasses.replace(model_config, kernels="auto")).named_parameters())
    names = {name: name for name in expected}
    if "lm_head.weight" not in tensors.where and _ties_head(folder, kind):
        names["lm_head.weight"] = "model.embed_tokens.weight"  # save_pretrained keeps one tensor for both
    missing = sorted(source for source in names.values() if source not in tensors.where)
    unexpected = sorted(name for name in tensors.where
                        if name not in expected and not name.endswith(IGNORED_HF_TENSORS))
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not hold the tensors of its config's model: "
                                + "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                                              f"unexpected {unexpected[:3]}" if unexpected else "")
                                            if part) + ".")
    for name, param in expected.items():
        shape = tuple(tensors.piece(names[name]).get_shape())
        if shape != tuple(param.shape):
            raise CheckpointError(f"{folder}: {names[name]} has shape {shape}, but its config.json makes it "
                                    f"{tuple(param.shape)}.")
    return names


# ------------------------------------------------------------------------------------------------
# Starting from other weights: the same model, or one sentence
# ------------------------------------------------------------------------------------------------
def check_same_model(source: ModelConfig, run: ModelConfig, where: str) -> None:
    """Refuse, in one sentence naming every differing field, weights of another model than the run's."""
    from megatron_mixln.model.norms import norm_placement

    differ = [field for field in SHAPE_FIELDS + FUNCTION_FIELDS if getattr(source, field) != getattr(run, field)]
    if not differ and source.norm_placement == "mix":
        kinds = [[norm_placement(i, c.num_layers, c) for i in range(c.num_layers)] for c in (source, run)]
        if kinds[0] != kinds[1]:
            differ = ["post_layers"] if source.post_layers is not None else ["mix_alpha"]
    if differ:
        raise ConfigError(f"{where} holds a model with " + ", ".join(f"{f}={getattr(source, f)!r}" for f in differ)
                          + ", but this run has " + ", ".join(f"model.{f}={getattr(run, f)!r}" for f in differ)
                          + "; set these to the source's values (a different vocabulary, norm, RoPE base or "
                          "placement would start from another model than the one named).")


