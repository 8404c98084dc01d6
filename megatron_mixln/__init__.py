"""megatron_mixln: LLaMA pre-training on DeepSpeed with Mix-LN and its normalisation-placement baselines."""
import os as _os

from megatron_mixln.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig, load_config

# The Triton kernels' modules (the package megatron_mixln.kernels, served by megatron_mixln/kernels.py): beside this
# file in a wheel, the repository's top-level kernels/ in a source tree or an editable install.
KERNELS_FOLDER = next((folder for folder in (_os.path.join(_os.path.dirname(__file__), "kernels"),
                                             _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "kernels"))
                       if _os.path.isfile(_os.path.join(folder, "rms_norm.py"))), None)

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "load_config",
           "build_model"]


def build_model(config: ModelConfig, **kwargs):
    """Build the LLaMA decoder for `config` (see megatron_mixln.model.llama)."""
    from megatron_mixln.model.llama import build_model as _build

    return _build(config, **kwargs)
