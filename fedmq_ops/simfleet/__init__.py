"""A simulated fleet: many device identities per process against a real aggregator
(``fedmq fleet simulate``; docs/scaling.md)."""

from fedmq_ops.simfleet.plan import Arrival, FleetPlan
from fedmq_ops.simfleet.runner import FleetReport, FleetSpec, enroll_fleet, run_fleet
from fedmq_ops.simfleet.shard import Shard, ShardResult, ShardSettings

__all__ = ["Arrival", "FleetPlan", "FleetReport", "FleetSpec", "Shard", "ShardResult",
           "ShardSettings", "enroll_fleet", "run_fleet"]
