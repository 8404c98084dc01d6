"""The Hugging Face modeling files copied into every non-Pre-LN export (`mixln-export --hf`).

`configuration_mixln.py` and `modeling_mixln.py` import only torch and transformers, so transformers can load an
exported folder with `trust_remote_code=True` without megatron_mixln installed. They are also importable from
here, which is how the exporter builds the model it saves (no code from an exported folder is ever executed).
"""
