"""Checkpoints. `peft`: LoRA adapters in Hugging Face PEFT's `save_pretrained` format; `state`: orbax
checkpoints of the whole server state, for exact resume."""

from fedask_jax.checkpoint.peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, export_peft, import_peft
from fedask_jax.checkpoint.state import StateCheckpoints, UnreadableCheckpoints

__all__ = [
  "ADAPTER_CONFIG_NAME",
  "ADAPTER_WEIGHTS_NAME",
  "StateCheckpoints",
  "UnreadableCheckpoints",
  "export_peft",
  "import_peft",
]
