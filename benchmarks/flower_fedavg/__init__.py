"""A Flower (1.42, Message API) FedAvg app that trains exactly what mmfl trains.

Used by ``benchmarks/bench_flower.py`` through ``flwr.simulation.run_simulation`` (Ray backend).

* :mod:`.client_app`: the ClientApp. Virtual SuperNode ``partition-id`` i is mmfl client i. It
  rebuilds the mmfl federation from the experiment config carried in every message (cached per
  Ray actor process), loads the global parameters it is sent, and runs E epochs of plain
  ``torch.optim.SGD`` on the index batches of :func:`mmfl.engines.sequential.local_batches`
  (same seed, round, client, task as mmfl) -- so it sees the same samples in the same order.
* :mod:`.server_app`: a ServerApp main loop: find the nodes, map partition ids to node ids
  (one ``query`` message each: start-up), then each round send ``train`` messages to the
  round's precomputed clients and replace the global model by the n_i-weighted average of the
  returned models (FedAvg).
"""
