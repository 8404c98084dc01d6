"""megatron_mixln: Megatron/DeepSpeed-style LLaMA pre-training with Mix-LN normalisation placement."""
from setuptools import find_packages, setup

setup(
    name="megatron_mixln",
    version="0.1.0",
    description="LLaMA pre-training on DeepSpeed with Mix-LN (Post-LN early layers, Pre-LN late layers)",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mixln", "megatron_mixln.*"]) + ["megatron_mixln.kernels"],
    # kernels/ is a top-level folder but must never import as `kernels` (that name is Hugging Face's): it has no
    # __init__.py, the wheel puts its modules in megatron_mixln/kernels/, and megatron_mixln/kernels.py serves them
    # (or, in a source tree or editable install, the top-level folder) as `megatron_mixln.kernels`.
    package_dir={"megatron_mixln.kernels": "kernels"},
    package_data={"megatron_mixln.data": ["assets/*"],  # the embedded corpus and its licence
                  "megatron_mixln.harness": ["tasks/*"]},  # mixln-eval's tiny local tasks (YAML + jsonl)
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "triton==3.9.0",
        "datasets>=4",
        "numpy>=1.26",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "PyYAML>=6",
        "tensorboard",  # run metrics through DeepSpeed's monitor, on by default (train.tensorboard)
        "psutil",  # host memory per logged step (also a DeepSpeed dependency)
        "lm-eval[hf]>=0.4.9",  # mixln-eval --tasks and train.downstream_tasks: lm-evaluation-harness's tasks and metrics ([hf]: its accelerate, for the hf backend our tests compare with)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "mpi4py>=4", "mpich"],
        # mpirun launches (rank discovery through mpi4py); `mpich` is a PyPI build of MPICH with mpirun. On a
        # cluster with its own MPI, install mpi4py alone so it binds to that MPI.
        "mpi": ["mpi4py>=4", "mpich"],
        "hf": ["transformers>=4.45"],
        "wandb": ["wandb"],  # train.wandb=true
    },
    entry_points={
        "console_scripts": [
            "mixln-train=megatron_mixln.cli:train_main",
            "mixln-prepare=megatron_mixln.cli:prepare_main",
            "mixln-export=megatron_mixln.cli:export_main",
            "mixln-import=megatron_mixln.cli:import_main",
            "mixln-eval=megatron_mixln.cli:eval_main",
            "mixln-finetune=megatron_mixln.finetune.command:main",
            "mixln-bench=megatron_mixln.cli:bench_main",
            "mixln-compare=megatron_mixln.research.compare:main",
            "mixln-analyze=megatron_mixln.cli:analyze_main",
            "mixln-study=megatron_mixln.research.study:console_main",
            "mixln-preflight=megatron_mixln.cli:preflight_main",
        ]
    },
)
