"""The sentence splitter's cost on long texts: pysbd's compiled patterns stay cached within a text, and the
replica's warm-up compiles its fixed ones before the first request."""

from __future__ import annotations

import re
import re._compiler

import pytest

from engine import segmentation

from conftest import SENTENCES

# 400 distinct lines: pysbd compiles a pattern per sentence it finds, more than re's default cache of 512 holds
# beside its fixed patterns.
LONG_TEXT = " ".join(f"{SENTENCES[i % len(SENTENCES)]} See item {i}." for i in range(400))


@pytest.fixture
def compiles(monkeypatch):
    """Counts regular expressions compiled (re's cache misses) from a purged cache."""
    count = [0]
    compile_ = re._compiler.compile

    def counting(*args, **kwargs):
        count[0] += 1
        return compile_(*args, **kwargs)

    monkeypatch.setattr(re._compiler, "compile", counting)
    re.purge()
    yield count
    re.purge()


def test_splitting_a_long_text_again_compiles_nothing(compiles):
    assert re._MAXCACHE >= segmentation.REGEX_CACHE  # set when engine.segmentation is imported
    first = segmentation.split(LONG_TEXT)
    assert len(first.sentences) > 700 and compiles[0] > 512
    compiles[0] = 0
    assert segmentation.split(LONG_TEXT) == first and compiles[0] == 0


def test_the_warm_up_compiles_most_patterns_a_first_text_needs(compiles):
    text = " ".join(SENTENCES * 3)
    segmentation.split(text)
    cold = compiles[0]
    re.purge()
    segmentation.warmup()
    compiles[0] = 0
    segmentation.split(text)
    assert cold > 100 and compiles[0] < cold / 2


@pytest.mark.parametrize("separator", ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85"])
def test_every_line_break_separates_sentences_and_is_kept(separator):
    # These were dropped as control characters: "Select the cell.\fClick the button." was one sentence, translated
    # "Wählen Sie die Zelle aus.Click die Schaltfläche.", its separator lost.
    text = f"Select the cell.{separator}Click the button."
    split = segmentation.split(text)
    assert split.sentences == ["Select the cell.", "Click the button."]
    assert split.join(split.sentences) == text
    assert segmentation.split("a\x00b\x07c\x1b").sentences == ["abc"]  # other controls are still dropped
    from engine import rich_text  # XML 1.0 forbids most of them: dropped there, as before, not a 422
    expected = (["Select the cell.", "Click the button."] if separator == "\x85"
                else ["Select the cell.Click the button."])
    assert rich_text.prepare(f"<p>Select the cell.{separator}Click the button.</p>", "xml").sentences == expected


def test_threads_splitting_at_once_split_as_one_thread_does():
    # The service splits long texts on worker threads; through one shared pysbd Segmenter, texts split at the same
    # time were mixed up (sentences merged into runs that the model returned untranslated).
    from concurrent.futures import ThreadPoolExecutor

    texts = [" ".join(SENTENCES[k % len(SENTENCES)] for k in range(60)) + f" Number {i}." for i in range(32)]
    expected = [segmentation.split(t).sentences for t in texts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda t: segmentation.split(t).sentences, texts)) == expected
