"""Data for federated fine-tuning: sources -> records -> templates -> token arrays -> client partitions ->
fixed-shape client batches.

- `sources`: records from local JSONL (plain or .gz), Hugging Face `datasets`, tensorflow-datasets.
- `corpora`: GSM8K (derived `category` = solution steps, the held-out test set) and Tiny Shakespeare
  (speaker records).
- `templates`: Stanford Alpaca and plain prompt/response templates.
- `encoding`: tokenisation to [N, L] arrays with a response-only loss mask (the loss itself:
  `fedask_jax.objectives.causal_lm_loss`).
- `partition`: IID (stratified), Dirichlet(alpha) and natural client partitions.
- `batching`: padded per-client arrays and the jit-able per-round Poisson / uniform batch sampler.

A typical pipeline:

  records = load_gsm8k("train")
  encoded = encode(records, GSM8K_ALPACA, tokenizer, max_seq_len=512)
  partition = partition_records(records, "dirichlet", num_clients=10, alpha=0.5, seed=0)
  client_data = stack_clients(encoded, partition)
  batch = client_batches(round_key, client_data, client_ids, local_steps=10, batch_size=6, capacity=20)
"""

from fedask_jax.data.batching import Batch, ClientData, client_batches, shard_rows, stack_clients
from fedask_jax.data.corpora import (
  GSM8K_ALPACA,
  gsm8k_category,
  gsm8k_eval_set,
  gsm8k_final_answer,
  gsm8k_num_steps,
  load_gsm8k,
  load_tiny_shakespeare,
  strip_calculator_annotations,
)
from fedask_jax.data.encoding import EncodedDataset, encode, encode_pairs
from fedask_jax.data.partition import (
  Partition,
  dirichlet_partition,
  iid_partition,
  natural_partition,
  partition_records,
)
from fedask_jax.data.sources import load_hf, load_jsonl, load_tfds, open_text
from fedask_jax.data.templates import AlpacaTemplate, PlainTemplate, Template, get_template

__all__ = [
  "AlpacaTemplate",
  "Batch",
  "ClientData",
  "EncodedDataset",
  "GSM8K_ALPACA",
  "Partition",
  "PlainTemplate",
  "Template",
  "client_batches",
  "dirichlet_partition",
  "encode",
  "encode_pairs",
  "get_template",
  "gsm8k_category",
  "gsm8k_eval_set",
  "gsm8k_final_answer",
  "gsm8k_num_steps",
  "iid_partition",
  "load_gsm8k",
  "load_hf",
  "load_jsonl",
  "load_tfds",
  "load_tiny_shakespeare",
  "natural_partition",
  "open_text",
  "partition_records",
  "shard_rows",
  "stack_clients",
  "strip_calculator_annotations",
]
