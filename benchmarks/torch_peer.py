"""The DP FedASK round written with the official implementation's stack, PyTorch + peft + Opacus: the peer that
`benchmarks/run.py` times against the compiled round (`fedask_jax.simulation.FederatedRound`).

Structure of the official PyTorch code: a Python loop over the K sampled clients; each client copies the
global adapters into a peft model, builds a fresh AdamW wrapped in Opacus's `DPOptimizer`, and runs tau local
steps on an Opacus `GradSampleModule` (per-sample gradients by backward hooks, "flat" clipping to C over all
trained parameters, Gaussian noise of std sigma C on the clipped sum, division by the expected batch size);
the server then aggregates the clients' factors with the two-stage sketch (docs/design.md, sections 1.3 and 1.4, here in
`torch.linalg`). Same mathematics as `FederatedRound` with `DPConfig(mechanism="b_space")` and the "fedask"
strategy: lora_A (the paper's A) frozen at the global value, lora_B trained, per-example loss the mean
next-token cross-entropy on the loss-mask tokens (`fedask_jax.objectives.causal_lm_loss`), AdamW lr 5e-4,
betas (0.9, 0.999), eps 1e-8, no weight decay, fresh every round. Only the random streams differ (Opacus's
noise, the sketch's Omega); with sigma = 0 both give the same aggregate product (tests/test_benchmarks.py).

Layouts: peft stores lora_A.weight [r, in] and lora_B.weight [out, r], their transposes are our lora_a [in, r]
and lora_b [r, out] (`fedask_jax.lora`). Adapters cross this module's boundary as {dotted module path: (lora_a,
lora_b)} numpy arrays in our layout, keyed by our paths ("model.layers.0.self_attn.q_proj").

torch, peft and Opacus are benchmark-only, optional dependencies: `missing()` says why the peer cannot run.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

PEFT_PREFIX = "base_model.model."
REQUIREMENTS = ("torch", "peft", "opacus", "transformers")


def missing() -> str | None:
  """None when torch, peft, Opacus and transformers import; otherwise the reason (for the benchmark's JSON)."""
  for name in REQUIREMENTS:
    try:
      importlib.import_module(name)
    except ImportError as error:
      return f"{name} is not installed ({error}); install the benchmark extra: pip install 'fedask-jax[bench]'"
  return None


def versions() -> dict[str, str]:
  """Versions of the peer's stack."""
  return {name: importlib.import_module(name).__version__ for name in REQUIREMENTS}


class TorchFedASKRound:
  """A DP FedASK round on a transformers Llama with peft LoRA and Opacus (module docstring).

  Args:
    hf_config: keyword arguments of `transformers.LlamaConfig` (the architecture).
    rank, alpha, target_modules: the LoRA configuration (peft's r, lora_alpha, target_modules; no dropout).
    clip_norm, noise_multiplier, expected_batch_size: C, sigma and q n of DP-SGD (Opacus's max_grad_norm,
      noise_multiplier, expected_batch_size).
    oversample: the sketch's p (width r + p).
    lr: AdamW's learning rate.
    checkpoint: a `save_pretrained` directory to load the base weights from (None: random, seeded by `seed`).
    seed: seeds the random base weights and the initial adapters.
    device: torch device (default: "cuda" when available, else "cpu").
  """

  def __init__(
    self,
    hf_config: Mapping[str, Any],
    *,
    rank: int,
    alpha: float,
    target_modules: tuple[str, ...],
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    oversample: int = 2,
    lr: float = 5e-4,
    checkpoint: str | None = None,
    seed: int = 0,
    device: str | None = None,
  ):
    import opacus
    import peft
    import torch
    import transformers

    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    if checkpoint is None:
      base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    else:
      base = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    base.eval()  # no dropout anywhere, as the compiled round without LoRA dropout
    config = peft.LoraConfig(
      r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules), bias="none"
    )
    model = peft.get_peft_model(base, config).to(self.device)
    self.layers = {
      name[len(PEFT_PREFIX) :]: module
      for name, module in model.named_modules()
      if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    for layer in self.layers.values():
      layer.lora_A["default"].weight.requires_grad_(False)  # FedASK under DP: A frozen, B trained
    with warnings.catch_warnings():
      # strict=False: the rotary embedding's inv_freq buffer makes Opacus warn; it holds no trained parameter,
      # so every trained parameter (the lora_B kernels, nn.Linear) still gets exact per-sample gradients.
      warnings.simplefilter("ignore")
      self.model = opacus.GradSampleModule(model, loss_reduction="mean", strict=False)
    # The frozen embedding's output does not require grad, so torch says the first hooked module's backward
    # hook fires on output gradients only; that is all Opacus needs (per-sample grads from activations and
    # output gradients).
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    self.trained = [layer.lora_B["default"].weight for layer in self.layers.values()]
    self.rank, self.oversample, self.lr = rank, oversample, lr
    self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
    self.expected_batch_size = expected_batch_size
    self._torch, self._opacus = torch, opacus

  def adapters(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The model's current adapters {path: (a [in, r], b [r, out])} in Flax layout."""
    return {
      name: (
        layer.lora_A["default"].weight.detach().cpu().numpy().T.copy(),
        layer.lora_B["default"].weight.detach().cpu().numpy().T.copy(),
      )
      for name, layer in self.layers.items()
    }

  def to_torch(self, adapters: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """Flax-layout {path: (a, b)} -> {path: (A [r, in], B [out, r])} float32 torch tensors."""
    as_tensor = lambda x: self._torch.tensor(np.asarray(x, np.float32).T.copy(), device=self.device)
    return {name: (as_tensor(a), as_tensor(b)) for name, (a, b) in adapters.items()}

  @staticmethod
  def to_flax(adapters: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{path: (A, B)} torch -> Flax-layout {path: (a, b)} numpy."""
    return {name: (a.cpu().numpy().T.copy(), b.cpu().numpy().T.copy()) for name, (a, b) in adapters.items()}

  def _per_example_loss(self, input_ids: Any, attention_mask: Any, loss_mask: Any) -> Any:
    """[B, L] -> [B]: mean next-token cross-entropy over each example's loss-mask tokens."""
    torch = self._torch
    logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    weights = loss_mask[:, 1:].float()
    return (nll * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)

  def client_update(
    self, global_adapters: Mapping[str, tuple[Any, Any]], batch: Mapping[str, Any], generator: Any
  ) -> dict[str, Any]:
    """One client's tau DP-SGD steps on lora_B from the global adapters; batch leaves [S, B, L] torch.
    Returns its trained B factors {path: B [out, r]}."""
    torch = self._torch
    with torch.no_grad():
      for name, layer in self.layers.items():
        a, b = global_adapters[name]
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    # A fresh optimiser per client and round: the official code builds a new trainer each time.
    optimizer = self._opacus.optimizers.DPOptimizer(
      torch.optim.AdamW(self.trained, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
      noise_multiplier=self.noise_multiplier,
      max_grad_norm=self.clip_norm,
      expected_batch_size=self.expected_batch_size,
      loss_reduction="mean",
      generator=generator,
    )
    for step in range(batch["input_ids"].shape[0]):
      optimizer.zero_grad(set_to_none=True)
      # The mean over the batch: Opacus multiplies the per-sample gradients back by the batch size
      # (loss_reduction="mean"), clips them one by one, and divides the noisy sum by expected_batch_size.
      loss = self._per_example_loss(*(batch[k][step] for k in ("input_ids", "attention_mask", "loss_mask"))).mean()
      loss.backward()
      optimizer.step()
    return {name: layer.lora_B["default"].weight.detach().clone() for name, layer in self.layers.items()}

  def aggregate(
    self, global_adapters: Mapping[str, tuple[Any, Any]], client_b: list[dict[str, Any]], weights: Any, generator: Any
  ) -> dict[str, tuple[Any, Any]]:
    """FedASK's server step per layer (paper layout; A_k = the global A, frozen): Y = sum_k w_k B_k (A Omega),
    Q = orth(Y), P = sum_k w_k A^T (B_k^T Q), P^T = U S V^T, B = Q U_r S_r^{1/2}, A = S_r^{1/2} V_r^T."""
    torch = self._torch
    weights = weights / weights.sum()
    new = {}
    for name, (a, _) in global_adapters.items():
      bs = torch.stack([client[name] for client in client_b])  # [K, out, r]
      omega = torch.randn(a.shape[1], self.rank + self.oversample, generator=generator).to(self.device)
      y = torch.einsum("k,kor,rw->ow", weights, bs, a @ omega)
      q = torch.linalg.qr(y).Q
      p = torch.einsum("k,ri,kor,ow->iw", weights, a, bs, q)
      u, s, vh = torch.linalg.svd(p.T, full_matrices=False)
      root = s[: self.rank].sqrt()
      new[name] = (root[:, None] * vh[: self.rank], q @ (u[:, : self.rank] * root))
    return new

  def __call__(
    self, global_adapters: Mapping[str, tuple[Any, Any]], batches: Mapping[str, Any], weights: Any, seed: int
  ) -> dict[str, tuple[Any, Any]]:
    """One round: `client_update` for each of the K clients in turn, then `aggregate`.

    global_adapters: {path: (A [r, in], B [out, r])} torch (`to_torch`); batches: {"input_ids",
    "attention_mask", "loss_mask"} torch [K, S, B, L] (every slot a real example); weights [K] torch.
    Returns the new global adapters in the same layout, computed (on a GPU: synchronised) when it returns.
    """
    torch = self._torch
    clients = []
    for k in range(batches["input_ids"].shape[0]):
      generator = torch.Generator(self.device).manual_seed(seed * 1_000_003 + k)
      clients.append(self.client_update(global_adapters, {key: x[k] for key, x in batches.items()}, generator))
    new = self.aggregate(global_adapters, clients, weights, torch.Generator().manual_seed(seed))
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
    return new
