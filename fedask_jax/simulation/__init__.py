"""One compiled federated round: sampled clients' local (DP-)training, mapped over clients, and the strategy's
server step, all under one `jax.jit` (docs/design.md, section 3).

K clients are sampled per round out of N, each runs S = local_steps steps on batches of `capacity` slots of L
tokens (`fedask_jax.adapters` for the adapters' pytree). Round t (1-based) of `FederatedRound` composes three
pure functions:

1. The strategy names the trained factor(s), `strategy.trained(t, private)`: "lora_a", "lora_b" or "both".
   This is a static choice: each value gets its own compiled round (fedask-alt compiles two, for odd and even
   rounds), so a round computes, clips and noises gradients of the trained factors only. A traced switch would
   compute per-example gradients of both factors every round (twice the per-example gradient memory and FLOPs
   in B-space, and the W-space projection needs to know the frozen side), to save one compilation.
2. `client_update` (`client.py`): one client's local training; `map_clients` (`round.py`) maps it over the
   K clients (vmapped in chunks, sharded over devices).
3. `server_step` (`server.py`): the strategy's `server_update` on the clients' results, leaving out clients
   whose result is not finite. `round_step` (`round.py`) composes 2 and 3 and adds the clients' metrics:
   the mean train loss over the valid clients, the fraction of their real examples clipped, per-client losses,
   non-finite example counts and update norms,
   `client_valid`, `invalid_clients`, `skipped`, and the strategy's own (FedASK: the exactness certificate
   `reconstruction_error`).

Keys (docs/design.md, section 3.1): client k's key is `fold_in(round_key, client_id)` (its steps' keys: `client.py`).
The server's key (FedASK's Omega) is `server_key(round_key)` = `fold_in(round_key, SERVER_STREAM)`, client
sampling uses `fold_in(round_key, SAMPLING_STREAM)`, and the batches should be drawn with `data_key(round_key)`
(= `fold_in(round_key, DATA_STREAM)`): reusing the round key for `fedask_jax.data.client_batches` would make the
Poisson sampling and the DP noise of a client's step come from the same key. Client ids stay below these
stream constants.

Several hosts (`jax.distributed`). The same code runs on a multi-host mesh (`fedask_jax.runner` does this
under `fedask-jax train` with the config's `distributed` section; tests/test_multiprocess.py):

    jax.distributed.initialize()                       # one process per host, before any other JAX call
    mesh = client_mesh()                               # every device of every process
    rnd = FederatedRound(model, strategy, mesh=mesh)  # every host loads the same base model
    ids = sample_clients(round_key, N, K)              # same ids on every host (same key)
    batches = client_batches(data_key(round_key), ...) # the same K clients' batches, drawn on every host
    state, metrics = rnd(state, batches, ids, weights, round_key, t)

The round passes its per-client inputs through `fedask_jax.data.shard_rows`: each host feeds only the rows of the
clients whose devices it holds (`jax.make_array_from_process_local_data`), and arrays already laid out over every
host's devices are taken as they are. K must be a multiple of the device count.
"""

from fedask_jax.simulation.client import (
  MECHANISMS,
  ClientMetrics,
  DPConfig,
  LocalTraining,
  causal_lm_example_loss,
  client_update,
  default_optimizer,
  local_training,
  response_example_loss,
)
from fedask_jax.simulation.round import (
  CLIENT_AXIS,
  DATA_STREAM,
  SAMPLING_STREAM,
  SERVER_STREAM,
  FederatedRound,
  client_mesh,
  client_weights,
  data_key,
  map_clients,
  round_step,
  sample_clients,
  server_key,
)
from fedask_jax.simulation.server import ServerState, finite_clients, server_step
