"""The committed real-text evaluation sets (loadtests/eval_real_text.py --build): real catalog strings with their
German translations, at least 300 with placeholders and some with balanced inline markup in each."""

import pytest

from loadtests import eval_real_text as ev


@pytest.mark.parametrize("path", [ev.DATA, ev.DATA_UNSEEN])
def test_eval_set_holds_real_strings_with_placeholders_and_markup(path):
    rows = ev.load(path)
    placeholders = [r for r in rows if r["kind"] == "placeholders"]
    markup = [r for r in rows if r["kind"] == "markup"]
    assert len(placeholders) >= 300 and len(markup) >= 60
    assert all(r["en"] and r["de"] and r["en"] != r["de"] and r["catalog"] for r in rows)
    assert all(ev.PLACEHOLDER.search(r["en"]) for r in placeholders)
    assert all(ev.TAG.search(r["en"]) and ev._tags(r["en"]) for r in markup)
    assert len({r["en"] for r in rows}) == len(rows)


def test_unseen_catalogs_are_not_the_corpus_catalogs():
    assert not {r["catalog"].split(":")[0] for r in ev.load(ev.DATA_UNSEEN)} & {"django", "sphinx", "ckan", "indico"}
