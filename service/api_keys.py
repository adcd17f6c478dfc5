"""API keys and per-key limits of the translation API: pure Python, no Ray and no HTTP.

Keys live in a YAML (or JSON) file, typically a mounted secret, that holds only their SHA-256 digests:

    keys:
      - id: alice                       # the key's name in /v1/usage, logs and metrics (never the key)
        sha256: 9f86d081884c7d65...     # hex digest of the key: python -m service.api_keys new --id alice
        characters_per_minute: 100000   # omitted or null: unlimited
        characters_per_day: 5000000
        max_concurrent_requests: 8

A fast hash suffices because keys are generated with 256 random bits (``new_key``): no dictionary or brute-force
attack on a leaked digest is feasible, and verifying a request costs one SHA-256 instead of a key-stretching
function's milliseconds. A presented key is compared with every stored digest by ``hmac.compare_digest`` without an
early exit, so the time taken does not tell which digest, or how much of one, matched.

``UsageLimiter`` keeps each key's usage and decides admission: characters per minute (a sliding 60 s window of
1 s buckets), characters per UTC day, and requests in flight. The characters of a request are reserved when it is
admitted; they stay charged when it was translated or when decoding worked on it until its deadline (504) or until
its client left (499), and are refunded when the service refused it before decoding (4xx, 503) or failed (5xx), so
a key cannot spend decoding time for free with requests made to time out.
One limiter serves all replicas of an application (service/usage_ledger.py holds it in a Ray actor).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import hashlib
import hmac
import itertools
import json
import math
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import yaml

KEY_PREFIX = "nmt_"
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
WINDOW_S = 60  # the per-minute limit's sliding window, seconds
# HTTP statuses whose request is charged: translated (200), or decoded until its deadline (504) or until its
# client left (499). Every other status was refused before decoding or failed on the service's side: refunded.
CHARGED_STATUSES = frozenset({200, 499, 504})


class KeyFileError(ValueError):
    """The API-key file cannot be read or is invalid; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyLimits:
    """Limits of one key; None is unlimited.

    Attributes:
        characters_per_minute: source characters (Unicode code points of the texts) in any 60 s window.
        characters_per_day: source characters per UTC calendar day.
        max_concurrent_requests: requests of this key being translated at once.
    """

    characters_per_minute: int | None = None
    characters_per_day: int | None = None
    max_concurrent_requests: int | None = None

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiKey:
    """One stored key: its id, the SHA-256 digest of the key (32 bytes) and its limits."""

    key_id: str
    digest: bytes
    limits: KeyLimits


def new_key() -> str:
    """A new API key: the prefix and 256 random bits, URL-safe base64 (47 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    """SHA-256 of the key's UTF-8 bytes (32 bytes)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``X-API-Key: <key>``, ``Authorization: Bearer <key>`` or
    ``Authorization: DeepL-Auth-Key <key>`` (the DeepL API's scheme); None when it presents none."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() in ("bearer", "deepl-auth-key") and value.strip():
        return value.strip()
    return None


class KeyStore:
    """The configured keys.

    Raises:
        KeyFileError: (``load``) a missing or unreadable file, a bad entry, a duplicate id or digest.
    """

    def __init__(self, keys: list[ApiKey]) -> None:
        if not keys:
            raise KeyFileError("no keys configured: add at least one entry under 'keys'")
        self.keys = keys
        self.limits = {k.key_id: k.limits for k in keys}

    @classmethod
    def load(cls, path: str | Path) -> "KeyStore":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise KeyFileError(f"cannot read API-key file {path}: {e}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise KeyFileError(f"{path}: expected a mapping with a list under 'keys'")
        keys, ids, digests = [], set(), set()
        limit_names = {f.name for f in dataclasses.fields(KeyLimits)}
        for i, entry in enumerate(entries):
            where = f"{path}: keys[{i}]"
            if not isinstance(entry, dict):
                raise KeyFileError(f"{where}: expected a mapping")
            unknown = set(entry) - limit_names - {"id", "sha256"}
            if unknown:
                raise KeyFileError(f"{where}: unknown fields {sorted(unknown)}; allowed: id, sha256, "
                                   f"{', '.join(sorted(limit_names))}")
            key_id, hex_digest = entry.get("id"), str(entry.get("sha256", "")).lower()
            if not isinstance(key_id, str) or not _ID.match(key_id):
                raise KeyFileError(f"{where}: id must be 1-64 characters of A-Z a-z 0-9 . _ -, got {key_id!r}")
            if not _DIGEST.match(hex_digest):
                raise KeyFileError(f"{where} ({key_id}): sha256 must be 64 hex digits (the key's SHA-256; "
                                   f"python -m service.api_keys new --id {key_id} makes a key and its entry)")
            if key_id in ids or hex_digest in digests:
                raise KeyFileError(f"{where}: duplicate {'id ' + key_id if key_id in ids else 'sha256'}")
            try:
                limits = KeyLimits(**{k: v for k, v in entry.items() if k in limit_names})
            except ValueError as e:
                raise KeyFileError(f"{where} ({key_id}): {e}") from None
            ids.add(key_id)
            digests.add(hex_digest)
            keys.append(ApiKey(key_id=key_id, digest=bytes.fromhex(hex_digest), limits=limits))
        return cls(keys)

    def identify(self, presented: str | None) -> str | None:
        """The id of the key whose digest matches ``presented``, or None. Constant time in the key material: every
        stored digest is compared, with no early exit."""
        if not presented:
            return None
        given, found = digest(presented), None
        for key in self.keys:
            if hmac.compare_digest(given, key.digest):
                found = key.key_id
        return found


@dataclasses.dataclass(frozen=True)
class Admission:
    """The limiter's answer: ``ticket`` (to release) when admitted, else ``limit`` (the limit that refused) and
    ``retry_after_s`` (whole seconds until the request would be admitted); ``never`` when the request alone
    exceeds a limit, so no retry can help."""

    ticket: int | None = None
    limit: str | None = None
    retry_after_s: int = 0
    never: bool = False


@dataclasses.dataclass
class _Usage:
    window: collections.deque = dataclasses.field(default_factory=collections.deque)  # [second, characters]
    window_characters: int = 0
    day: dt.date | None = None
    characters_today: int = 0
    characters_total: int = 0
    requests_total: int = 0
    refused_total: int = 0
    in_flight: dict = dataclasses.field(default_factory=dict)  # ticket -> (lease end, characters, second, day)


class UsageLimiter:
    """Per-key usage and admission by the key's limits.

    Args:
        limits: key id -> KeyLimits.
        clock: seconds since the epoch (time.time); tests pass a fake one.
    """

    def __init__(self, limits: Mapping[str, KeyLimits], clock: Callable[[], float] = time.time) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self._usage: dict[str, _Usage] = {k: _Usage() for k in self.limits}
        self._tickets = itertools.count(1)
        self._owner: dict[int, str] = {}

    def set_limits(self, limits: Mapping[str, KeyLimits]) -> None:
        """New limits (a reloaded key file); the usage of keys that remain is kept."""
        self.limits = dict(limits)
        for key_id in self.limits:
            self._usage.setdefault(key_id, _Usage())

    def acquire(self, key_id: str, characters: int, lease_s: float) -> Admission:
        """Admits a request of ``characters`` source characters for ``key_id`` or says which limit refuses it.
        An admitted request holds a concurrency slot until ``release`` or, if its replica died, until ``lease_s``
        seconds have passed.

        Raises:
            KeyError: an unknown key id.
        """
        limits, usage, now = self.limits[key_id], self._usage[key_id], self.clock()
        second = int(now)
        self._roll(usage, now)
        if limits.max_concurrent_requests is not None and len(usage.in_flight) >= limits.max_concurrent_requests:
            return self._refuse(usage, "max_concurrent_requests", 1)
        per_minute = limits.characters_per_minute
        if per_minute is not None:
            if characters > per_minute:
                return self._refuse(usage, "characters_per_minute", 0, never=True)
            if usage.window_characters + characters > per_minute:
                # The window frees characters as its oldest seconds expire: wait for enough of them.
                excess, wait = usage.window_characters + characters - per_minute, 1
                for bucket_second, bucket_characters in usage.window:
                    excess -= bucket_characters
                    if excess <= 0:
                        wait = bucket_second + WINDOW_S - second
                        break
                return self._refuse(usage, "characters_per_minute", max(1, wait))
        per_day = limits.characters_per_day
        if per_day is not None:
            if characters > per_day:
                return self._refuse(usage, "characters_per_day", 0, never=True)
            if usage.characters_today + characters > per_day:
                tomorrow = dt.datetime.combine(usage.day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
                return self._refuse(usage, "characters_per_day", max(1, math.ceil(tomorrow.timestamp() - now)))
        if usage.window and usage.window[-1][0] == second:
            usage.window[-1][1] += characters
        else:
            usage.window.append([second, characters])
        usage.window_characters += characters
        usage.characters_today += characters
        usage.characters_total += characters
        ticket = next(self._tickets)
        usage.in_flight[ticket] = (now + lease_s, characters, second, usage.day)
        self._owner[ticket] = key_id
        return Admission(ticket=ticket)

    def release(self, ticket: int, status: int) -> None:
        """Ends an admitted request with its HTTP ``status``. One not in CHARGED_STATUSES gives its characters back
        (to the minute window while its second is still in it, to the day while it is the same day); a 200 counts
        in ``requests_total``. Releasing an unknown or expired ticket does nothing."""
        key_id = self._owner.pop(ticket, None)
        if key_id is None or key_id not in self._usage:
            return
        usage = self._usage[key_id]
        lease = usage.in_flight.pop(ticket, None)
        if lease is None:
            return
        if status == 200:
            usage.requests_total += 1
        if status in CHARGED_STATUSES:
            return
        _, characters, second, day = lease
        self._roll(usage, self.clock())
        usage.characters_total -= characters
        if day == usage.day:
            usage.characters_today -= characters
        for bucket in usage.window:
            if bucket[0] == second:
                bucket[1] -= characters
                usage.window_characters -= characters
                break

    def usage(self, key_id: str) -> dict:
        """The key's usage and limits as JSON-ready values (GET /v1/usage).

        Raises:
            KeyError: an unknown key id.
        """
        limits, usage, now = self.limits[key_id], self._usage[key_id], self.clock()
        self._roll(usage, now)
        return {"key_id": key_id, "characters_last_minute": usage.window_characters,
                "characters_today": usage.characters_today, "characters_total": usage.characters_total,
                "requests_total": usage.requests_total, "refused_requests_total": usage.refused_total,
                "concurrent_requests": len(usage.in_flight), "day": usage.day.isoformat(),
                "limits": dataclasses.asdict(limits)}

    @staticmethod
    def _refuse(usage: _Usage, limit: str, retry_after_s: int, never: bool = False) -> Admission:
        usage.refused_total += 1
        return Admission(limit=limit, retry_after_s=retry_after_s, never=never)

    def _roll(self, usage: _Usage, now: float) -> None:
        """Drops window seconds older than WINDOW_S, resets the day at UTC midnight, ends expired leases."""
        second = int(now)
        while usage.window and usage.window[0][0] <= second - WINDOW_S:
            usage.window_characters -= usage.window.popleft()[1]
        today = dt.datetime.fromtimestamp(now, dt.timezone.utc).date()
        if usage.day != today:
            usage.day, usage.characters_today = today, 0
        for ticket in [t for t, lease in usage.in_flight.items() if lease[0] <= now]:
            del usage.in_flight[ticket]  # its replica died mid-request: the characters stay counted
            self._owner.pop(ticket, None)


def main(argv: list[str] | None = None) -> None:
    """``python -m service.api_keys new --id ID [--file keys.yaml] [limits]``: makes a key, prints it once, and
    appends its entry (digest and limits, never the key) to the file, or prints the entry."""
    parser = argparse.ArgumentParser(prog="python -m service.api_keys", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make a key and its entry")
    new.add_argument("--id", required=True, help="the key's id (1-64 of A-Z a-z 0-9 . _ -)")
    new.add_argument("--file", type=Path, help="append the entry to this key file (created if missing)")
    for f in dataclasses.fields(KeyLimits):
        new.add_argument("--" + f.name.replace("_", "-"), type=int, dest=f.name)
    args = parser.parse_args(argv)
    key = new_key()
    entry = {"id": args.id, "sha256": digest(key).hex(),
             **{f.name: getattr(args, f.name) for f in dataclasses.fields(KeyLimits)
                if getattr(args, f.name) is not None}}
    if args.file is None:
        print(json.dumps(entry), file=sys.stderr)  # the entry to paste into a key file
    else:
        data = (yaml.safe_load(args.file.read_text()) if args.file.exists() else None) or {"keys": []}
        data["keys"].append(entry)
        staged = args.file.with_name(args.file.name + ".new")
        staged.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            KeyStore.load(staged)  # refuses a duplicate id before the file changes
        except KeyFileError as e:
            staged.unlink()
            parser.error(str(e).replace(str(staged), str(args.file)))
        staged.replace(args.file)
        print(f"entry {args.id!r} added to {args.file}", file=sys.stderr)
    print(key)


if __name__ == "__main__":
    main()
