"""The usage ledger: one UsageLimiter per Serve application, held by a named Ray actor so that every replica of the
application, on any node, admits against the same per-key counts (limits per replica would multiply with
autoscaling).

The actor is detached and found by name: it survives the replica that created it, and a replica restarted by Serve
finds the same counts. It needs no CPU (a few microseconds per call). If it dies, Ray restarts it with empty counts
(max_restarts=-1): a restart forgets the current minute's and day's usage, which the README states.

Its methods are ``async`` so that Ray runs it as an async actor, which executes calls out of order: an ordered
actor whose caller's call was cancelled before it ran waits for the missing sequence number, and every key's
requests hung with it for two minutes (seen in a break-it run). Each method runs to completion without awaiting, so
the limiter still sees one call at a time.
"""

from __future__ import annotations

import ray

from service.api_keys import Admission, KeyLimits, UsageLimiter

NAMESPACE = "nmt-serve"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class UsageLedger:
    """UsageLimiter behind a Ray actor; see service.api_keys.UsageLimiter for each method."""

    def __init__(self, limits: dict[str, KeyLimits]) -> None:
        self.limiter = UsageLimiter(limits)

    async def set_limits(self, limits: dict[str, KeyLimits]) -> None:
        self.limiter.set_limits(limits)

    async def acquire(self, key_id: str, characters: int, lease_s: float) -> Admission:
        return self.limiter.acquire(key_id, characters, lease_s)

    async def release(self, ticket: int, status: int) -> None:
        self.limiter.release(ticket, status)

    async def usage(self, key_id: str) -> dict:
        return self.limiter.usage(key_id)


def ledger_for(app_name: str, limits: dict[str, KeyLimits]) -> ray.actor.ActorHandle:
    """The application's ledger, created by the first replica that asks; each replica then sends the limits of the
    key file it loaded (all replicas of one application load the same file)."""
    ledger = UsageLedger.options(name=f"usage-ledger-{app_name}", namespace=NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote(limits)
    ledger.set_limits.remote(limits)
    return ledger
