"""The HTTP benchmark's closed loop against a real service (one start): no errors, sane latencies, real batches;
and the bodies it sends, against a stub server."""

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


def test_the_closed_loop_sends_each_sentence_its_own_options():
    """Options per sentence (bench_scheduling's capacity run): a stub server (no Ray, no model) records the bodies."""
    import asyncio
    import threading

    from aiohttp import web

    from loadtests.bench_http import _free_port, closed_loop

    bodies, ready, box = [], threading.Event(), {"port": _free_port()}

    async def translate(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        await asyncio.sleep(0.002)
        return web.json_response({"translation": ""})

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/translate", translate)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", box["port"]).start())
        box["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    sentences = [f"sentence {i}" for i in range(7)]
    beams = {i: [1, 4, 16][i % 3] for i in range(7)}
    try:
        result = closed_loop(f"http://127.0.0.1:{box['port']}", sentences, clients=3, seconds=0.5,
                             body_options=lambda i: {"beam_size": beams[i]}, warmup_s=0.1)
    finally:
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        thread.join(10)
    assert result["errors"] == 0 and len(bodies) >= 14, (result, len(bodies))
    assert {b["text"] for b in bodies} == set(sentences)
    for body in bodies:
        assert body["beam_size"] == beams[int(body["text"].split()[1])], body
