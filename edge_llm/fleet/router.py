"""The Ray Serve request router that keeps a conversation on the replica holding its KV state.

Serve calls `choose_replicas` for each request to the replicas' deployment handle (in the ingress
process) and sends the request to the first replica of the first rank that accepts it (queue below
`max_ongoing_requests`), trying later ranks after. The ranks come from `affinity.choose`: the
replica that served the longest known prefix of this prompt (or, for a conversation never seen,
the one rendezvous hashing gives its first message, so that several ingress replicas agree without
sharing state), unless it has more than `max_imbalance` requests beyond the least loaded replica;
then everyone else, least loaded first.
"""

from __future__ import annotations

from edge_llm.errors import MissingExtraError

try:  # the `ray` extra: Serve loads this router by name inside a Ray cluster
    from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError:
    raise MissingExtraError("ray[serve] (needed by --ray)", "ray") from None

from edge_llm.fleet.affinity import PrefixIndex, choose, rendezvous


def request_keys(pending_request: PendingRequest | None) -> list[str]:
    """The affinity keys the ingress computed for this request (EdgeReplica.handle's argument)."""
    if pending_request is None:
        return []
    keys = pending_request.kwargs.get("affinity")
    return list(keys) if isinstance(keys, (list, tuple)) else []


class ConversationRouter(RequestRouter):
    def initialize_state(self, max_imbalance: int = 2, max_entries: int = 100_000) -> None:
        self.max_imbalance = max_imbalance
        self.index = PrefixIndex(max_entries)
        # Requests this router sent and that have not completed, per replica. Serve's queue-length
        # cache lags (entries expire, probes are periodic): a burst of one conversation's requests
        # would all see the owner as idle and pile onto it.
        self.in_flight: dict[ReplicaID, set[str]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        if not by_id:
            return []
        queue = self.replica_queue_len_cache
        loads = {rid: max(queue.get(rid) or 0, len(self.in_flight.get(rid, ()))) for rid in by_id}
        keys = request_keys(pending_request)
        preferred = None
        if keys:
            preferred, _ = self.index.lookup(keys, by_id)
            if preferred is None:
                preferred = rendezvous(keys[0], by_id, name=lambda rid: rid.unique_id)
        return [[by_id[rid] for rid in rank] for rank in choose(preferred, loads, max_imbalance=self.max_imbalance)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        self.in_flight.setdefault(replica_id, set()).add(pending_request.metadata.internal_request_id)
        keys = request_keys(pending_request)
        if keys:
            self.index.record(keys, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight.get(replica_id, set()).discard(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id)
        self.in_flight.pop(replica_id, None)
