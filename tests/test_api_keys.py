"""API keys and per-key limits (service/api_keys.py) on a fake clock: what is stored, how keys are found, and each
limit's admission, Retry-After, refunds and leases."""

import datetime as dt
import subprocess
import sys

import pytest
import yaml

from service.api_keys import (KeyFileError, KeyLimits, KeyStore, UsageLimiter, digest, new_key, presented_key)

# 2026-12-02 23:59:00 UTC: one minute before a UTC midnight.
NEAR_MIDNIGHT = dt.datetime(2026, 12, 2, 23, 59, 0, tzinfo=dt.timezone.utc).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_keys(path, entries):
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def test_the_file_holds_digests_and_the_store_finds_each_key_and_no_other(tmp_path):
    a, b = new_key(), new_key()
    assert a != b and a.startswith("nmt_") and len(a) >= 40
    path = write_keys(tmp_path / "keys.yaml", [{"id": "alice", "sha256": digest(a).hex(), "characters_per_day": 10},
                                               {"id": "bob", "sha256": digest(b).hex()}])
    # The common mistake, the key itself pasted where its digest goes, is refused rather than matched.
    with pytest.raises(KeyFileError, match="sha256 must be 64 hex"):
        KeyStore.load(write_keys(tmp_path / "plain.yaml", [{"id": "alice", "sha256": a}]))
    store = KeyStore.load(path)
    assert store.identify(a) == "alice" and store.identify(b) == "bob"
    for wrong in (None, "", a[:-1], a + "x", a.upper(), "nmt_" + "A" * 43, digest(a).hex()):
        assert store.identify(wrong) is None
    assert store.limits["alice"] == KeyLimits(characters_per_day=10)
    assert store.limits["bob"] == KeyLimits()


@pytest.mark.parametrize("entries, message", [
    ([], "no keys"),
    ([{"id": "a b", "sha256": "0" * 64}], "id must be"),
    ([{"id": "a", "sha256": "abc"}], "sha256 must be 64 hex"),
    ([{"id": "a", "sha256": "0" * 64}, {"id": "a", "sha256": "1" * 64}], "duplicate id a"),
    ([{"id": "a", "sha256": "0" * 64}, {"id": "b", "sha256": "0" * 64}], "duplicate sha256"),
    ([{"id": "a", "sha256": "0" * 64, "characters_per_day": 0}], "characters_per_day must be a positive"),
    ([{"id": "a", "sha256": "0" * 64, "key": "plaintext"}], "unknown fields ['key']"),
])
def test_bad_key_files_are_refused_with_the_entry_and_the_reason(tmp_path, entries, message):
    with pytest.raises(KeyFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        KeyStore.load(write_keys(tmp_path / "keys.yaml", entries))


def test_a_missing_or_malformed_file_is_a_clear_error(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore.load(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("keys: [")
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore.load(tmp_path / "bad.yaml")


def test_keys_are_read_from_the_headers_clients_send():
    assert presented_key({"x-api-key": " k1 "}) == "k1"
    assert presented_key({"authorization": "Bearer k2"}) == "k2"
    assert presented_key({"authorization": "bearer k3"}) == "k3"
    assert presented_key({"authorization": "DeepL-Auth-Key k4"}) == "k4"
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer "}, {"x-api-key": ""}):
        assert presented_key(headers) is None


def test_the_cli_appends_an_entry_prints_the_key_once_and_refuses_a_duplicate_id(tmp_path):
    path = tmp_path / "keys.yaml"
    run = [sys.executable, "-m", "service.api_keys", "new", "--file", str(path)]
    first = subprocess.run(run + ["--id", "alice", "--characters-per-minute", "500"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip()
    assert key not in path.read_text()
    store = KeyStore.load(path)
    assert store.identify(key) == "alice" and store.limits["alice"].characters_per_minute == 500
    again = subprocess.run(run + ["--id", "alice"], capture_output=True, text=True)
    assert again.returncode == 2 and "duplicate id alice" in again.stderr and "Traceback" not in again.stderr
    assert KeyStore.load(path).identify(key) == "alice"  # the file is unchanged


def test_characters_per_minute_is_a_sliding_window_with_an_exact_retry_after():
    clock = Clock(1_000_000.0)
    limiter = UsageLimiter({"k": KeyLimits(characters_per_minute=100)}, clock)
    first = limiter.acquire("k", 60, lease_s=30)
    limiter.release(first.ticket, status=200)
    clock.now += 20
    second = limiter.acquire("k", 40, lease_s=30)
    limiter.release(second.ticket, status=200)
    refused = limiter.acquire("k", 30, lease_s=30)
    # The first 60 characters leave the window 60 s after they came: 40 s from now.
    assert refused.ticket is None and refused.limit == "characters_per_minute" and refused.retry_after_s == 40
    clock.now += 39
    assert limiter.acquire("k", 30, lease_s=30).ticket is None
    clock.now += 1
    assert limiter.acquire("k", 30, lease_s=30).ticket is not None
    assert limiter.usage("k")["characters_last_minute"] == 70


def test_characters_per_day_resets_at_utc_midnight():
    clock = Clock(NEAR_MIDNIGHT)
    limiter = UsageLimiter({"k": KeyLimits(characters_per_day=50)}, clock)
    limiter.release(limiter.acquire("k", 50, lease_s=30).ticket, status=200)
    refused = limiter.acquire("k", 1, lease_s=30)
    assert refused.limit == "characters_per_day" and refused.retry_after_s == 60
    clock.now += 60
    assert limiter.acquire("k", 50, lease_s=30).ticket is not None
    usage = limiter.usage("k")
    assert usage["day"] == "2026-12-03" and usage["characters_today"] == 50 and usage["characters_total"] == 100


def test_a_request_larger_than_a_limit_is_never_admitted():
    limiter = UsageLimiter({"k": KeyLimits(characters_per_minute=100, characters_per_day=1000)}, Clock(0.0))
    assert limiter.acquire("k", 101, lease_s=30).never
    assert not limiter.acquire("k", 100, lease_s=30).never


def test_concurrency_slots_are_held_until_release_or_lease_end():
    clock = Clock(5000.0)
    limiter = UsageLimiter({"k": KeyLimits(max_concurrent_requests=2)}, clock)
    a, b = limiter.acquire("k", 1, lease_s=30), limiter.acquire("k", 1, lease_s=30)
    refused = limiter.acquire("k", 1, lease_s=30)
    assert refused.limit == "max_concurrent_requests" and refused.retry_after_s == 1
    limiter.release(a.ticket, status=200)
    c = limiter.acquire("k", 1, lease_s=30)
    assert c.ticket is not None and limiter.usage("k")["concurrent_requests"] == 2
    clock.now += 30  # b's and c's replica died: their leases end
    assert limiter.usage("k")["concurrent_requests"] == 0
    limiter.release(b.ticket, status=200)  # a late release of an ended lease does nothing
    assert limiter.usage("k")["requests_total"] == 1


def test_failed_requests_give_their_characters_back_and_keys_are_independent():
    clock = Clock(10_000.0)
    limiter = UsageLimiter({"a": KeyLimits(characters_per_minute=100), "b": KeyLimits(characters_per_minute=100)},
                           clock)
    failed = limiter.acquire("a", 100, lease_s=30)
    assert limiter.acquire("a", 1, lease_s=30).ticket is None
    assert limiter.acquire("b", 100, lease_s=30).ticket is not None  # another key, the same second
    limiter.release(failed.ticket, status=503)
    usage = limiter.usage("a")
    assert (usage["characters_last_minute"], usage["characters_today"], usage["characters_total"],
            usage["requests_total"], usage["refused_requests_total"]) == (0, 0, 0, 0, 1)
    assert limiter.acquire("a", 100, lease_s=30).ticket is not None


def test_new_limits_keep_the_usage_of_remaining_keys():
    limiter = UsageLimiter({"a": KeyLimits()}, Clock(0.0))
    limiter.release(limiter.acquire("a", 7, lease_s=30).ticket, status=200)
    limiter.set_limits({"a": KeyLimits(characters_per_minute=7), "b": KeyLimits()})
    assert limiter.usage("a")["characters_total"] == 7 and limiter.acquire("a", 1, lease_s=30).ticket is None
    assert limiter.usage("b")["characters_total"] == 0
    with pytest.raises(KeyError):
        limiter.acquire("nobody", 1, lease_s=30)


@pytest.mark.parametrize("status, charged", [(200, True), (504, True), (499, True), (413, False), (422, False),
                                             (503, False), (500, False)])
def test_decoded_requests_are_charged_and_refused_ones_refunded(status, charged):
    limiter = UsageLimiter({"k": KeyLimits(characters_per_minute=100)}, Clock(20_000.0))
    limiter.release(limiter.acquire("k", 80, lease_s=30).ticket, status=status)
    usage = limiter.usage("k")
    assert usage["characters_total"] == (80 if charged else 0)
    assert usage["requests_total"] == (1 if status == 200 else 0) and usage["concurrent_requests"] == 0
    assert (limiter.acquire("k", 80, lease_s=30).ticket is None) == charged


def test_an_answer_waits_for_its_keys_release_to_reach_the_ledger():
    """service.app: _Outcome.finish returns the release's future and _released waits for it, so a response (and
    a stream's "done") leaves only once the ledger has the slot back (before, a client's next request could reach
    the ledger first and get 429 for the slot it had just given back)."""
    import asyncio
    import concurrent.futures
    import threading
    import time

    from service.app import _Outcome, _released

    class Counting:
        def request(self, *args):
            pass

    class SlowLedgerAccess:
        metrics = Counting()

        def __init__(self):
            self.released_at = None

        def release(self, ticket, status):
            future = concurrent.futures.Future()

            def later():
                time.sleep(0.2)
                self.released_at = time.monotonic()
                future.set_result(None)
            threading.Thread(target=later).start()
            return future

    access = SlowLedgerAccess()
    outcome = _Outcome(Counting(), access)
    outcome.key_id, outcome.ticket = "k", 7
    asyncio.run(_released(outcome.finish(200)))
    assert access.released_at is not None and time.monotonic() >= access.released_at
    assert outcome.ticket is None and outcome.finish(200) is None  # released once
