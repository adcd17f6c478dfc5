"""The HTTP benchmark's closed loop against a real service (one start): no errors, sane latencies, real batches."""

import pytest

from conftest import SENTENCES


@pytest.fixture(scope="module")
def bench_service(artifact):
    from loadtests.bench_http import start_service

    base_url, metrics_url, shutdown = start_service(str(artifact), threads=1, max_batch_rows=256,
                                                    device="cpu")
    yield base_url, metrics_url
    shutdown()


def test_closed_loop_at_4_clients(bench_service):
    from loadtests.bench_http import closed_loop

    base_url, metrics_url = bench_service
    result = closed_loop(base_url, SENTENCES, clients=4, seconds=3, body_options={"beam_size": 2},
                         metrics_url=metrics_url, warmup_s=1.0)
    assert result["errors"] == 0, result
    assert result["requests"] > 0 and result["sentences_per_s"] > 0
    # Little's law: 4 closed-loop clients keep about 4 requests in flight (throughput x latency; 3.6 here with the
    # median latency). A loop that sent one request at a time would keep at most 1.
    in_flight = result["sentences_per_s"] * result["latency_p50_s"]
    assert 2 <= in_flight <= 4 * 1.5, result
    assert result["mean_rows_per_step"] is not None and result["mean_rows_per_step"] >= 1, result


def test_one_client_alternates_http_and_the_engine_alone_on_the_same_texts(bench_service):
    """bench_scheduling's scenario 4: each HTTP request is followed by the engine-alone call on its text."""
    import asyncio

    from loadtests.bench_scheduling import _sequential

    calls = []

    def engine_alone(text):
        calls.append(text)

    texts = SENTENCES[:4]
    http, alone = asyncio.run(_sequential(bench_service[0], texts, engine_alone))
    assert calls == texts[:2] + texts  # two warm-up calls, then one after each request
    assert len(http) == len(alone) == len(texts) and all(t > 0 for t in http)
