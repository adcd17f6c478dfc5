"""loadtests/bench_ingress.py runs the service through each ingress for real and reports figures for both."""


def test_each_ingress_is_the_one_measured(artifact, capsys):
    from loadtests.bench_ingress import main

    results = main(["--artifact", str(artifact), "--requests", "3"])
    # The port the client used belonged to HAProxy in one run and to Serve's Python proxy in the other.
    assert results["haproxy"]["listener"] == "haproxy"
    assert results["python-proxy"]["listener"].startswith("ray::ProxyAct")
    for figures in results.values():
        assert all(v > 0 for k, v in figures.items() if k.endswith("_ms"))
    assert "HTTP/engine beam 4" in capsys.readouterr().out
