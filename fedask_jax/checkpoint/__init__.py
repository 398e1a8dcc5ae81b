"""Checkpoint interop. `peft`: LoRA adapters in Hugging Face PEFT's `save_pretrained` format."""

from fedask_jax.checkpoint.peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, export_peft, import_peft

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "export_peft", "import_peft"]
