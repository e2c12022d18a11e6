"""Consolidated exports: model.safetensors + config.json + tokenizer.model + README.md (model card)."""
from mmscale.export.format import load_export, load_export_config, load_export_state, save_export  # noqa: F401
