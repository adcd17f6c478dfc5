"""The LibreTranslate and DeepL dialects, driven by the real client libraries from PyPI (libretranslatepy, deepl)
against a real Ray Serve replica with API keys; their translations must be the engine's own."""

import json
import urllib.error

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import SENTENCES, free_port

MAX_CHARS = 3000


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    import ray
    from ray import serve

    from service.api_keys import digest, new_key
    from service.app import TranslatorDeployment

    tmp = tmp_path_factory.mktemp("compat")
    keys = {"bob": new_key(), "alice": new_key(), "dora": new_key(), "erin": new_key()}
    limits = {"bob": {}, "alice": {"characters_per_minute": 120}, "dora": {"characters_per_day": 40}, "erin": {}}
    (tmp / "keys.yaml").write_text(json.dumps({"keys": [{"id": k, "sha256": digest(v).hex(), **limits[k]}
                                                        for k, v in keys.items()]}))
    metrics_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    app = TranslatorDeployment.bind({"artifact_dir": str(artifact), "model_id": "en-de", "device": "cpu",
                                     "api_keys_file": str(tmp / "keys.yaml"), "max_chars_per_request": MAX_CHARS,
                                     "max_chars_per_text": MAX_CHARS})
    serve.run(app, name="translation", route_prefix="/")
    base = f"http://127.0.0.1:{http_port}"
    yield {"url": base, "lt": base + "/libretranslate", "deepl": base + "/deepl/", "keys": keys,
           "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture()
def no_deepl_retries(monkeypatch):
    """The deepl library retries 429 and 5xx answers with back-off (5 times by default); the error tests want the
    first answer."""
    import deepl

    monkeypatch.setattr(deepl.http_client, "max_network_retries", 0)


def native(served, body: dict, key: str) -> dict:
    r = requests.post(served["url"] + "/translate", json=body, headers={"X-API-Key": served["keys"][key]},
                      timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --- LibreTranslate -------------------------------------------------------------------------------------------------

def test_libretranslatepy_translates_like_the_engine(served, translator):
    from libretranslatepy import LibreTranslateAPI

    lt = LibreTranslateAPI(served["lt"], api_key=served["keys"]["bob"])
    for sentence in SENTENCES[:3]:
        assert lt.translate(sentence, "en", "de") == translator.translate([sentence])[0].text


def test_libretranslate_list_alternatives_and_auto_detection(served, translator):
    # libretranslatepy sends form fields and cannot send a list (it would send the list's repr); LibreTranslate's
    # list form is a JSON body, as Weblate and LibreTranslate's own page send it.
    texts = [SENTENCES[1], SENTENCES[5]]
    r = requests.post(served["lt"] + "/translate", json={"q": texts, "source": "auto", "target": "de",
                                                         "alternatives": 2, "api_key": served["keys"]["bob"]},
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    beam_size = max(3, translator.default_options.beam_size)  # alternatives widen the model's beam if need be
    expected = native(served, {"text": texts, "beam_size": beam_size, "n_best": 3, "return_scores": True}, "bob")
    assert body["translatedText"] == [t["text"] for t in expected["translations"]]
    assert body["alternatives"] == [[h["text"] for h in t["n_best"][1:]] for t in expected["translations"]]
    assert [d["language"] for d in body["detectedLanguage"]] == ["en", "en"]
    assert all(50 < d["confidence"] <= 100 for d in body["detectedLanguage"])


def test_markup_through_both_apis_keeps_its_tags(served):
    import xml.etree.ElementTree as ET

    import deepl
    from libretranslatepy import LibreTranslateAPI

    source = "<p>Select <b>the cell</b> and click <a href=\"x.html\">Save</a>.</p>"
    form = {"q": source, "source": "en", "target": "de", "format": "html", "api_key": served["keys"]["bob"]}
    r = requests.post(served["lt"] + "/translate", data=form, timeout=60)
    assert r.status_code == 200, r.text
    via_deepl = deepl.Translator(served["keys"]["bob"], server_url=served["deepl"]).translate_text(
        source, target_lang="DE", tag_handling="html").text
    for out in (r.json()["translatedText"], via_deepl):
        root = ET.fromstring(out)  # well-formed
        assert [e.tag for e in root.iter()] == ["p", "b", "a"] and root.find("a").get("href") == "x.html"
    assert "15" in LibreTranslateAPI(served["lt"], api_key=served["keys"]["bob"]).translate("Delete 15 files.", "en", "de")


def test_libretranslate_languages_detect_and_settings(served):
    from libretranslatepy import LibreTranslateAPI

    lt = LibreTranslateAPI(served["lt"])
    assert {"code": "en", "name": "English", "targets": ["de"]} in lt.languages()
    lt = LibreTranslateAPI(served["lt"], api_key=served["keys"]["bob"])
    german = lt.detect("Die Datei konnte nicht geöffnet werden.")
    english = lt.detect(SENTENCES[3])
    assert german[0]["language"] == "de" and english[0]["language"] == "en"
    assert german[0]["confidence"] >= german[1]["confidence"]
    settings = requests.get(served["lt"] + "/frontend/settings", timeout=10).json()
    assert settings["keyRequired"] is True and settings["charLimit"] == MAX_CHARS
    assert settings["language"]["source"]["code"] == "en" and settings["language"]["target"]["code"] == "de"


def lt_error(call) -> tuple[int, dict]:
    with pytest.raises(urllib.error.HTTPError) as raised:
        call()
    return raised.value.code, json.loads(raised.value.read())


def test_libretranslate_errors_are_its_own(served):
    from libretranslatepy import LibreTranslateAPI

    keys = served["keys"]
    status, body = lt_error(lambda: LibreTranslateAPI(served["lt"], api_key="wrong").translate("Hi.", "en", "de"))
    assert status == 403 and "Invalid API key" in body["error"]
    status, body = lt_error(lambda: LibreTranslateAPI(served["lt"]).translate("Hi.", "en", "de"))  # no key
    assert status == 403
    lt = LibreTranslateAPI(served["lt"], api_key=keys["bob"])
    status, body = lt_error(lambda: lt.translate("Hi.", "en", "fr"))
    assert status == 400 and "en->fr is not supported" in body["error"]
    status, body = lt_error(lambda: lt.translate("x" * (MAX_CHARS + 1), "en", "de"))
    assert status == 400 and f"limit max_chars_per_text={MAX_CHARS}" in body["error"]
    form = {"q": "Select <b>the cell</b>.", "source": "en", "target": "de", "format": "xml", "api_key": keys["bob"]}
    r = requests.post(served["lt"] + "/translate", data=form, timeout=30)
    assert r.status_code == 400 and "format" in r.json()["error"]  # LibreTranslate knows text and html only
    r = requests.post(served["lt"] + "/translate", data={"source": "en", "target": "de", "api_key": keys["bob"]},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("q:")
    alice = LibreTranslateAPI(served["lt"], api_key=keys["alice"])
    assert alice.translate("x" * 100, "en", "de")
    with pytest.raises(urllib.error.HTTPError) as raised:
        alice.translate("x" * 100, "en", "de")  # 200 characters in a minute > 120
    assert raised.value.code == 429 and 1 <= int(raised.value.headers["Retry-After"]) <= 60
    assert "characters_per_minute" in json.loads(raised.value.read())["error"]


# --- DeepL ----------------------------------------------------------------------------------------------------------

def test_deepl_library_translates_like_the_engine(served, translator):
    import deepl

    client = deepl.Translator(served["keys"]["bob"], server_url=served["deepl"])
    one = client.translate_text(SENTENCES[0], target_lang="DE")
    assert one.text == translator.translate([SENTENCES[0]])[0].text and one.detected_source_lang == "EN"
    many = client.translate_text(SENTENCES[1:4], source_lang="EN", target_lang="DE")
    assert [r.text for r in many] == [t.text for t in translator.translate(SENTENCES[1:4])]
    assert [r.billed_characters for r in many] == [len(s) for s in SENTENCES[1:4]]
    # split_sentences "0": the text is one sentence, as split_sentences false is on /translate.
    two = f"{SENTENCES[0]} {SENTENCES[2]}"
    unsplit = client.translate_text(two, target_lang="DE", split_sentences="0")
    expected = native(served, {"text": two, "split_sentences": False}, "bob")["translations"][0]["text"]
    assert unsplit.text == expected


def test_deepl_form_bodies_repeat_text(served, translator):
    r = requests.post(served["deepl"] + "v2/translate", data=[("text", SENTENCES[2]), ("text", SENTENCES[5]),
                                                              ("target_lang", "DE")],
                      headers={"Authorization": f"DeepL-Auth-Key {served['keys']['bob']}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert [t["text"] for t in r.json()["translations"]] == [t.text for t in
                                                             translator.translate([SENTENCES[2], SENTENCES[5]])]


def test_deepl_languages_and_usage(served):
    import deepl

    client = deepl.Translator(served["keys"]["erin"], server_url=served["deepl"])
    assert [(x.code, x.name) for x in client.get_source_languages()] == [("EN", "English")]
    [target] = client.get_target_languages()
    assert (target.code, target.name, target.supports_formality) == ("DE", "German", False)
    before = client.get_usage().character.count
    client.translate_text([SENTENCES[0], SENTENCES[2]], target_lang="DE")
    usage = client.get_usage()
    assert usage.character.count - before == len(SENTENCES[0]) + len(SENTENCES[2])
    assert not usage.character.limit_reached
    # DeepL's v2 takes POST for both too (form or query parameters).
    auth = {"Authorization": "DeepL-Auth-Key " + served["keys"]["erin"]}
    r = requests.post(served["deepl"] + "v2/languages", data={"type": "target"}, headers=auth, timeout=30)
    assert r.status_code == 200 and [x["language"] for x in r.json()] == ["DE"], r.text
    r = requests.post(served["deepl"] + "v2/languages", json={"type": "target"}, headers=auth, timeout=30)
    assert r.status_code == 200 and [x["language"] for x in r.json()] == ["DE"], r.text
    r = requests.post(served["deepl"] + "v2/usage", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["character_count"] == usage.character.count, r.text


def test_unknown_routes_and_methods_answer_in_each_apis_error_shape(served):
    """404 and 405 under a compatible API's prefix come in its error body (a client shows its message)."""
    auth = {"Authorization": "DeepL-Auth-Key " + served["keys"]["bob"]}
    r = requests.get(served["deepl"] + "v2/glossaries", headers=auth, timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"message"}, r.text
    r = requests.delete(served["deepl"] + "v2/translate", headers=auth, timeout=30)
    assert r.status_code == 405 and set(r.json()) == {"message"} and r.headers["Allow"] == "POST", r.text
    r = requests.get(served["lt"] + "/nothing", timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text
    r = requests.get(served["url"] + "/translate", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["type"] == "http_error" and r.headers["Allow"] == "POST"


def test_deepl_errors_are_its_own(served, no_deepl_retries):
    import deepl

    keys = served["keys"]
    with pytest.raises(deepl.AuthorizationException):
        deepl.Translator("not-a-key", server_url=served["deepl"]).translate_text("Hi.", target_lang="DE")
    client = deepl.Translator(keys["bob"], server_url=served["deepl"])
    with pytest.raises(deepl.DeepLException, match="target_lang") as raised:
        client.translate_text("Hi.", target_lang="FR")
    assert raised.value.http_status_code == 400
    with pytest.raises(deepl.DeepLException, match="source_lang") as raised:
        client.translate_text("Hallo.", source_lang="FR", target_lang="DE")
    assert raised.value.http_status_code == 400
    with pytest.raises(deepl.DeepLException, match="tag_handling") as raised:
        client.translate_text("<p>Hi.</p>", target_lang="DE", tag_handling="sgml")
    assert raised.value.http_status_code == 400
    with pytest.raises(deepl.DeepLException, match="formality") as raised:
        client.translate_text("Hi.", target_lang="DE", formality="more")
    assert raised.value.http_status_code == 400
    assert client.translate_text("Hi.", target_lang="DE", formality="prefer_more").text  # falls back, as DeepL's
    with pytest.raises(deepl.DeepLException, match="Value for 'formality' not supported: 'bogus'") as raised:
        client.translate_text("Hi.", target_lang="DE", formality="bogus")
    assert raised.value.http_status_code == 400
    with pytest.raises(deepl.DeepLException, match=f"max_chars_per_text={MAX_CHARS}") as raised:
        client.translate_text("x" * (MAX_CHARS + 1), target_lang="DE")
    assert raised.value.http_status_code == 413
    dora = deepl.Translator(keys["dora"], server_url=served["deepl"])
    dora.translate_text("x" * 30, target_lang="DE")
    with pytest.raises(deepl.QuotaExceededException):  # 456: past its characters per day
        dora.translate_text("x" * 30, target_lang="DE")
    assert dora.get_usage().character.count == 30 and dora.get_usage().character.limit == 40


def test_hostile_bodies_get_4xx_never_5xx(served):
    headers = {"Authorization": f"DeepL-Auth-Key {served['keys']['bob']}"}
    cases = [
        (served["deepl"] + "v2/translate", b"\xff\xfe", {"Content-Type": "application/x-www-form-urlencoded"}),
        (served["deepl"] + "v2/translate", b"[1, 2]", {"Content-Type": "application/json"}),
        (served["deepl"] + "v2/translate", b'{"text": [1], "target_lang": "DE"}', {"Content-Type": "application/json"}),
        (served["deepl"] + "v2/translate", "&".join(["text=a"] * 2000).encode() + b"&target_lang=DE",
         {"Content-Type": "application/x-www-form-urlencoded"}),
        (served["deepl"] + "v2/translate", b"text=a&target_lang=DE&split_sentences=7",
         {"Content-Type": "application/x-www-form-urlencoded"}),
        (served["lt"] + "/translate", b"q=a&target=de&alternatives=99", {"Content-Type":
                                                                         "application/x-www-form-urlencoded"}),
        (served["lt"] + "/translate", b'{"q": {"a": 1}, "target": "de"}', {"Content-Type": "application/json"}),
        (served["lt"] + "/detect", b"", {"Content-Type": "application/json"}),
        (served["lt"] + "/translate", b"q=a&target=de", {"Content-Type": "text/plain"}),
        (served["deepl"] + "v2/translate", b"text=caf%E9&target_lang=DE",  # Latin-1 escape: no UTF-8
         {"Content-Type": "application/x-www-form-urlencoded"}),
    ]
    # Lone surrogate escapes, which Python's json module decodes (the tokenizer then failed: a 500).
    lone = [(served["lt"] + "/translate", b'{"q": "Hi \\ud800 there.", "source": "en", "target": "de"}'),
            (served["lt"] + "/translate", b'{"q": ["\\udfff"], "source": "en", "target": "de", "format": "html"}'),
            (served["deepl"] + "v2/translate", b'{"text": ["Hi \\ud800 there."], "source_lang": "EN", '
                                               b'"target_lang": "DE"}'),
            (served["deepl"] + "v2/translate", b'{"text": ["<b>\\ud800</b>"], "source_lang": "EN", '
                                               b'"target_lang": "DE", "tag_handling": "xml"}')]
    cases += [(url, body, {"Content-Type": "application/json"}) for url, body in lone]
    for url, body, extra in cases:
        r = requests.post(url, data=body, headers={**headers, **extra}, timeout=30)
        assert r.status_code == 400, (url, body[:60], r.status_code, r.text)
        assert set(r.json()) in ({"message"}, {"error"}), r.text
        if (url, body) in lone:
            assert "not valid Unicode" in r.text, r.text
    r = requests.get(served["deepl"] + "v2/languages", params={"type": "glossary"}, headers=headers, timeout=10)
    assert r.status_code == 400 and "type" in r.json()["message"]


def test_openapi_documents_the_routes_and_metrics_count_by_api(served):
    paths = requests.get(served["url"] + "/openapi.json", timeout=10).json()["paths"]
    for path in ("/libretranslate/translate", "/libretranslate/detect", "/libretranslate/languages",
                 "/libretranslate/frontend/settings", "/deepl/v2/translate", "/deepl/v2/languages",
                 "/deepl/v2/usage"):
        assert path in paths, path
    import time

    deadline, seen = time.monotonic() + 40, {}
    while time.monotonic() < deadline:
        seen = {}
        for family in text_string_to_metric_families(requests.get(served["metrics"], timeout=10).text):
            for s in family.samples:
                if s.name == "ray_nmt_requests_total":
                    key = (s.labels["api"], s.labels["status_class"])
                    seen[key] = seen.get(key, 0) + s.value
        if {("libretranslate", "2xx"), ("deepl", "2xx"), ("deepl", "4xx")} <= set(seen):
            break
        time.sleep(1)
    assert {("libretranslate", "2xx"), ("libretranslate", "4xx"), ("deepl", "2xx"), ("deepl", "4xx")} <= set(seen)
    assert {api for api, _ in seen} <= {"nmt", "libretranslate", "deepl"}  # bounded: no paths, no languages


def test_compat_error_shapes_hold_under_a_serve_route_prefix():
    """Under a route prefix (deploy's /int8, /cpu) the request path holds Serve's root_path: the DeepL and
    LibreTranslate shapes of 404/405 still apply (they fell back to this service's own shape)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.errors import install_handlers

    app = FastAPI()
    install_handlers(app)

    @app.post("/deepl/v2/translate")
    async def translate() -> dict:
        return {}

    for root in ("", "/int8"):
        client = TestClient(app, root_path=root)
        r = client.get(root + "/deepl/v2/glossaries")
        assert r.status_code == 404 and r.json() == {"message": "Not Found"}, (root, r.text)
        r = client.get(root + "/deepl/v2/translate")
        assert r.status_code == 405 and set(r.json()) == {"message"} and r.headers["Allow"] == "POST", (root, r.text)
        r = client.get(root + "/libretranslate/nothing")
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}, (root, r.text)
        r = client.get(root + "/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "http_error", (root, r.text)
