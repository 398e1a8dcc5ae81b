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
stream constants. `round_sampler` (`sampler.py`) draws a round's clients, weights and batches with these keys in
one jitted function, as the runner does.

Rounds in your own program. `FederatedRound.__call__` is a compiled round that donates its state, driven from
Python; `FederatedRound.step` is the same round as a pure function that traces into the caller's program, so
that R rounds run as one `jax.jit` of a `lax.scan`::

    def rounds(state, frozen, data, run_key):
      def one(state, t):                                 # t: the round number, traced
        round_key = jax.random.fold_in(run_key, t)
        ids, weights, batches = sample(round_key, data)  # sample = round_sampler(N, K, ...)
        return rnd.step(state, batches, ids, weights, round_key, t, frozen_state=frozen)
      return jax.lax.scan(one, state, jnp.arange(1, R + 1))

The round index only picks the trained factor, which is static: a traced index works for every strategy whose
choice does not depend on it, while fedask-alt (lora_b in odd rounds, lora_a in even ones) needs Python ints, so
its scan body runs two rounds, t = 2i + 1 with round_index=1 and t = 2i + 2 with round_index=2, each keyed
`fold_in(run_key, t)`.

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
from fedask_jax.simulation.sampler import round_sampler
from fedask_jax.simulation.server import ServerState, finite_clients, server_step
