"""fedask-jax: differentially private federated LoRA fine-tuning in JAX.

The core is FedASK (Differentially Private Federated Low Rank Adaptation Beyond Fixed-Matrix, NeurIPS 2025):
clients train LoRA adapters with DP-SGD and a two-stage randomized-SVD sketch lets the server aggregate the
adapters exactly and update both factors. See `design.md`-level docstrings in each module.
"""

__version__ = "0.1.0"
