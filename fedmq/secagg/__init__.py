"""Secure aggregation (SecAgg+-style): the aggregator learns only the sum of the round's
int8 updates. Pure: key agreement, mask generation, Shamir sharing, the neighbour graph,
tight ring packing, the phase messages and the client and server state machines
(docs/privacy.md, "Secure aggregation")."""
