"""API-key access control of one replica: who a request is (its key's id), whether its key's limits admit it, and
the key's usage. The keys and limits are service/api_keys.py's; the counts live in the application's usage ledger
(service/usage_ledger.py), shared by every replica. The HTTP layer (service/app.py) maps the errors raised here
to 401, 413, 429 and 503 through service/errors.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import ray

from engine.errors import EngineUnavailableError
from service.api_keys import KeyStore, presented_key
from service.errors import RateLimitedError, RequestTooLargeError, UnauthorizedError
from service.metrics import KeyMetrics
from service.usage_ledger import ledger_for

log = logging.getLogger("ray.serve")


class KeyAccess:
    """The keys of ``keys_file`` and the ledger of application ``app_name``.

    Raises:
        service.api_keys.KeyFileError: (constructor) a missing or invalid key file; the replica does not start.
    """

    def __init__(self, keys_file: Path, app_name: str) -> None:
        self.keys = KeyStore.load(keys_file)
        self.ledger = ledger_for(app_name, self.keys.limits)
        self.metrics = KeyMetrics()
        log.info("API keys required: %d keys from %s", len(self.keys.keys), keys_file)

    def identify(self, headers: Mapping[str, str]) -> str:
        """The id of the key the request presents (service.api_keys.presented_key).

        Raises:
            UnauthorizedError: no key, or one that matches no stored digest.
        """
        key_id = self.keys.identify(presented_key(headers))
        if key_id is None:
            raise UnauthorizedError("missing or wrong API key: send it as 'Authorization: Bearer <key>' or in the "
                                    "X-API-Key header")
        return key_id

    async def admit(self, key_id: str, characters: int, lease_s: float) -> int:
        """Admits a request of ``characters`` source characters by its key's limits and returns its ticket (to
        ``release``); the slot is held at most ``lease_s`` seconds if the release never comes.

        Raises:
            RateLimitedError: past a limit (429 with Retry-After).
            RequestTooLargeError: the request alone exceeds a limit of its key (413: no retry can help).
            EngineUnavailableError: the ledger is restarting (503).
        """
        try:
            admission = await self.ledger.acquire.remote(key_id, characters, lease_s)
        except ray.exceptions.RayError:
            raise EngineUnavailableError("the usage ledger is restarting; retry in a few seconds") from None
        if admission.ticket is not None:
            return admission.ticket
        self.metrics.refused(key_id, admission.limit)
        value = getattr(self.keys.limits[key_id], admission.limit)
        if admission.never:
            raise RequestTooLargeError(f"{characters} characters > the {admission.limit} limit {value} of API key "
                                       f"{key_id!r}: split the request")
        raise RateLimitedError(f"API key {key_id!r} is at its {admission.limit} limit ({value}); retry in "
                               f"{admission.retry_after_s} s", admission.retry_after_s)

    def release(self, ticket: int, succeeded: bool) -> None:
        """Ends an admitted request (its characters are refunded unless it succeeded); does not wait."""
        self.ledger.release.remote(ticket, succeeded)

    async def usage(self, key_id: str) -> dict:
        """The key's usage and limits (service.api_keys.UsageLimiter.usage).

        Raises:
            EngineUnavailableError: the ledger is restarting (503).
        """
        try:
            return await self.ledger.usage.remote(key_id)
        except ray.exceptions.RayError:
            raise EngineUnavailableError("the usage ledger is restarting; retry in a few seconds") from None
