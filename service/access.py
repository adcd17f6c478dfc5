"""API-key access control of one replica: who a request is (its key's id), whether its key's limits admit it, and
the key's usage. The keys and limits are service/api_keys.py's; the counts live in the application's usage ledger
(service/usage_ledger.py), shared by every replica. The HTTP layer (service/app.py) maps the errors raised here
to 401, 413, 429 and 503 through service/errors.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
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
LEDGER_TIMEOUT_S = 5.0  # a ledger that does not answer in this time gives a 503, never a hanging request
NEVER_DECODED = 0  # the release status of an admission whose request ended before it could decode: refunded


class KeyAccess:
    """The keys of ``keys_file`` and the ledger of application ``app_name``.

    Raises:
        service.api_keys.KeyFileError: (constructor) a missing or invalid key file; the replica does not start.
    """

    def __init__(self, keys_file: Path, app_name: str) -> None:
        self.keys = KeyStore.load(keys_file)
        self.ledger = ledger_for(app_name, self.keys.limits)
        self.metrics = KeyMetrics()
        # Ledger calls leave from threads of their own, not from the request's task: Ray cancels the actor calls of
        # a cancelled request (a client that left), which lost releases (slots held until their lease ended).
        self._calls = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="usage-ledger")
        log.info("API keys required: %d keys from %s", len(self.keys.keys), keys_file)

    def identify(self, headers: Mapping[str, str], body_key: str | None = None) -> str:
        """The id of the key the request presents (service.api_keys.presented_key), or else of ``body_key``: the
        ``api_key`` field of a LibreTranslate body.

        Raises:
            UnauthorizedError: no key, or one that matches no stored digest.
        """
        key_id = self.keys.identify(presented_key(headers) or body_key or None)
        if key_id is None:
            raise UnauthorizedError("missing or wrong API key: send it as 'Authorization: Bearer <key>', "
                                    "'Authorization: DeepL-Auth-Key <key>', in the X-API-Key header or as "
                                    "LibreTranslate's api_key field")
        return key_id

    async def admit(self, key_id: str, characters: int, lease_s: float) -> int:
        """Admits a request of ``characters`` source characters by its key's limits and returns its ticket (to
        ``release``); the slot is held at most ``lease_s`` seconds if the release never comes.

        Raises:
            RateLimitedError: past a limit (429 with Retry-After).
            RequestTooLargeError: the request alone exceeds a limit of its key (413: no retry can help).
            EngineUnavailableError: the ledger is restarting (503).
        """
        call = self._call(self.ledger.acquire, key_id, characters, lease_s)
        try:
            admission = await asyncio.shield(asyncio.wrap_future(call))
        except asyncio.CancelledError:
            call.add_done_callback(self._release_if_admitted)  # the client left while the ledger answered
            raise
        except ray.exceptions.RayError:
            raise self._unavailable() from None
        if admission.ticket is not None:
            return admission.ticket
        self.metrics.refused(key_id, admission.limit)
        value = getattr(self.keys.limits[key_id], admission.limit)
        if admission.never:
            raise RequestTooLargeError(f"{characters} characters > the {admission.limit} limit {value} of API key "
                                       f"{key_id!r}: split the request")
        raise RateLimitedError(f"API key {key_id!r} is at its {admission.limit} limit ({value}); retry in "
                               f"{admission.retry_after_s} s", admission.retry_after_s, admission.limit)

    def release(self, ticket: int, status: int) -> concurrent.futures.Future:
        """Ends an admitted request with its HTTP status (service.api_keys.CHARGED_STATUSES says which are
        charged); does not wait. Returns a future done when the ledger has taken the release: a response sent
        before that lets its client's next request reach the ledger first, and be refused for a slot it no longer
        holds (seen in CI: max_concurrent_requests 1, the next request right after the answer got 429)."""
        return self._call(self.ledger.release, ticket, status)

    async def usage(self, key_id: str) -> dict:
        """The key's usage and limits (service.api_keys.UsageLimiter.usage).

        Raises:
            EngineUnavailableError: the ledger is restarting (503).
        """
        try:
            return await asyncio.wrap_future(self._call(self.ledger.usage, key_id))
        except ray.exceptions.RayError:
            raise self._unavailable() from None

    def _call(self, method, *args) -> concurrent.futures.Future:
        return self._calls.submit(lambda: ray.get(method.remote(*args), timeout=LEDGER_TIMEOUT_S))

    def _release_if_admitted(self, call: concurrent.futures.Future) -> None:
        if not call.cancelled() and call.exception() is None and call.result().ticket is not None:
            self.release(call.result().ticket, NEVER_DECODED)

    @staticmethod
    def _unavailable() -> EngineUnavailableError:
        return EngineUnavailableError(f"the usage ledger did not answer within {LEDGER_TIMEOUT_S:g} s (restarting "
                                      f"or overloaded); retry in a few seconds")
