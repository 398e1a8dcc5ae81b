"""fedask-jax: differentially private federated LoRA fine-tuning in JAX.

The core is FedASK (Differentially Private Federated Low Rank Adaptation Beyond Fixed-Matrix, NeurIPS 2025):
clients train LoRA adapters with DP-SGD and a two-stage randomized-SVD sketch lets the server aggregate the
adapters exactly and update both factors. The method: docs/design.md, section 1; how the modules fit: section 2.
"""

import logging as _logging

__version__ = "0.1.0"


class _NoPyTorchAdvice(_logging.Filter):
  """Drops the one line that `import transformers` logs when PyTorch is not installed.

  "PyTorch was not found. Models won't be available and only tokenizers, configuration and file/data utilities
  can be used." is true and irrelevant here: fedask-jax uses transformers' configs and tokenizers only (its models
  are Flax NNX), so it would be the first thing a user without PyTorch sees. The filter sits on the
  "transformers" logger, which the line is logged on, and drops that message only; every other transformers
  message passes (TRANSFORMERS_NO_ADVISORY_WARNINGS would silence all of its advice). Installed here because
  this runs before any fedask_jax module imports transformers.
  """

  def filter(self, record: _logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found.")


_logging.getLogger("transformers").addFilter(_NoPyTorchAdvice())
