"""Forward + backward time of a small Llama-style model: fedask_jax.models (jitted value_and_grad) against the
same model in transformers (PyTorch eager, loss.backward()), on CPU.

The PyTorch model is built with a fixed seed and saved with `save_pretrained`; ours is loaded from that
checkpoint, so both hold the same weights (the JSON records both losses as a check). Two workloads:
- full: gradient of the mean next-token cross-entropy w.r.t. every parameter;
- lora: gradient w.r.t. LoRA adapters only (rank 8 on q_proj and v_proj; PEFT on the PyTorch side), base
  weights frozen, the setting of federated fine-tuning.
All four variants are timed side by side in one process, alternating run by run so machine load hits them
alike: compile time (lower + compile) separately, then the median of `--runs` runs after `--warmup` calls,
each ended by `block_until_ready` (JAX) or the end of `backward()` (PyTorch).

    python benchmarks/model_speed.py [--batch 8 --seq 128 --runs 7 --warmup 2]
        [--out benchmarks/results/model_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import tempfile

import harness  # benchmarks/harness.py, before jax: it sets the OpenBLAS threads
import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers
from flax import nnx

from fedask_jax import lora
from fedask_jax.models import load_pretrained

ARCH = dict(
  vocab_size=4096,
  hidden_size=256,
  intermediate_size=688,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=512,
)
LORA = lora.LoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))


def next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean cross-entropy of token t+1 given tokens <= t, as transformers' `labels=input_ids` loss."""
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def jax_step(model: nnx.Module, trainable: type):
  """A jitted `value_and_grad` of the loss w.r.t. the `trainable` variables (nnx.Param or nnx.LoRAParam)."""
  graphdef, params, rest = nnx.split(model, trainable, ...)

  @jax.jit
  def step(params, rest, ids):
    return jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p, rest)(ids), ids))(params)

  return step, (params, rest)


def torch_step(model: torch.nn.Module, ids: torch.Tensor):
  def step():
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="benchmarks/results/model_speed.json")
  args = parser.parse_args()
  if args.runs < 5:
    parser.error(f"--runs={args.runs}: a median needs at least 5 runs.")

  load_before = os.getloadavg()
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH))
  ids_np = np.random.RandomState(0).randint(0, ARCH["vocab_size"], (args.batch, args.seq))
  ids, ids_torch = jnp.asarray(ids_np), torch.tensor(ids_np)
  with tempfile.TemporaryDirectory() as directory:
    hf_model.save_pretrained(directory)
    ours_full = load_pretrained(directory)
    ours_lora = load_pretrained(directory, lora=LORA)
  # get_peft_model rewires the model it is given: PEFT gets its own copy of the same weights.
  peft_model = peft.get_peft_model(
    copy.deepcopy(hf_model),
    peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(LORA.target_modules)),
  )
  hf_model.train()
  peft_model.train()

  compile_s, jax_fns = {}, {}
  for name, model, trainable in (("jax full", ours_full, nnx.Param), ("jax lora", ours_lora, nnx.LoRAParam)):
    step, (params, rest) = jax_step(model, trainable)
    compiled, compile_s[name] = harness.compile_timed(step, params, rest, ids)
    jax_fns[name] = lambda compiled=compiled, params=params, rest=rest: jax.block_until_ready(
      compiled(params, rest, ids)
    )
  fns = {**jax_fns, "torch full": torch_step(hf_model, ids_torch), "torch lora": torch_step(peft_model, ids_torch)}

  # The first call of each is the first warm-up pass, and gives the losses that show both hold the same weights.
  losses = {name: float(fn()[0]) if name.startswith("jax") else fn().item() for name, fn in fns.items()}
  times = harness.time_alternating(
    {name: (lambda: None, lambda _, fn=fn: fn()) for name, fn in fns.items()}, args.runs, warmup=args.warmup - 1
  )
  timing = {name: harness.summary(t, compile_s.get(name)) for name, t in times.items()}
  median = {name: v["median_s"] for name, v in timing.items()}

  print(
    f"Llama-style {ARCH['num_hidden_layers']} layers, d={ARCH['hidden_size']}, heads "
    f"{ARCH['num_attention_heads']}/{ARCH['num_key_value_heads']}, ffn {ARCH['intermediate_size']}, vocab "
    f"{ARCH['vocab_size']}; batch {args.batch} x seq {args.seq}; CPU, median of {args.runs} runs"
  )
  print(f"{'variant':<12}{'median ms':>12}{'min ms':>10}{'compile s':>11}{'loss':>10}")
  for name in fns:
    compile_text = f"{compile_s[name]:.2f}" if name in compile_s else "-"
    print(
      f"{name:<12}{1e3 * median[name]:>12.1f}{1e3 * timing[name]['min_s']:>10.1f}{compile_text:>11}"
      f"{losses[name]:>10.4f}"
    )
  ratios = {kind: median[f"torch {kind}"] / median[f"jax {kind}"] for kind in ("full", "lora")}
  print(
    f"speed-up of ours over transformers (torch median / jax median): full {ratios['full']:.2f}x, "
    f"lora {ratios['lora']:.2f}x"
  )

  result = {
    "architecture": ARCH,
    "lora": {"rank": LORA.rank, "alpha": LORA.alpha, "targets": list(LORA.target_modules)},
    "batch": args.batch,
    "seq": args.seq,
    "runs": args.runs,
    "warmup": args.warmup,
    "timing": timing,
    "losses": losses,
    "speedup_torch_over_jax": ratios,
    "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    "machine": dict(harness.machine(load_before), torch_threads=torch.get_num_threads()),
  }
  harness.write(result, pathlib.Path(args.out))


if __name__ == "__main__":
  main()
