"""Real-world text on the bundled model, offline (engine/rich_text.py): markup kept and well-formed, protected spans
copied exactly once, capitals restored; plain text unchanged by the new path."""

import dataclasses
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import protect, rich_text
from engine.errors import InvalidRequestError

from conftest import SENTENCES


def translate(translator, text, format="text", terms=()):
    return rich_text.translate(translator, [text], format=format, terms=terms)[0]


def well_formed(markup: str) -> ET.Element:
    return ET.fromstring(f"<root>{markup}</root>")


def html_tags(markup: str) -> list[str]:
    """The start tags of well-formed HTML, in order. Raises AssertionError for an end tag that closes anything but
    the innermost open element, or an element left open (void elements excepted)."""
    import html.parser

    from engine.markup import VOID

    opened, stack = [], []

    class Checker(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            opened.append(tag)
            if tag not in VOID:
                stack.append(tag)

        def handle_endtag(self, tag):
            assert stack and stack[-1] == tag, f"</{tag}> closes {stack[-1:]} in {markup}"
            stack.pop()

    Checker().feed(markup)
    assert not stack, f"left open: {stack} in {markup}"
    return opened


def test_plain_text_without_spans_is_translated_exactly_as_before(translator):
    texts = SENTENCES[:4] + ["Select the cell. Click the button to save the document.\n\nThe printer is off."]
    expected = [translator.translate([t])[0].text for t in SENTENCES[:4]]
    got = rich_text.translate(translator, texts)
    assert got[:4] == expected
    assert got[4].count("\n\n") == 1


def test_the_issues_examples_keep_tags_dates_urls_placeholders_and_capitals(translator):
    out = translate(translator, "Press <b>Ctrl+S</b> to save the file.", "html")
    assert out.count("<b>") == out.count("</b>") == 1 and re.search(r"<b>\S.*</b>", out), out
    well_formed(out)
    source = "Version 2.4.1 was released on 2024-05-01, see https://example.org/docs?id=7."
    out = translate(translator, source)
    for span in ("2.4.1", "2024-05-01", "https://example.org/docs?id=7"):
        assert out.count(span) == 1, (span, out)
    for source, spans in [("Deleted %(count)d files from {folder}.", ["%(count)d", "{folder}"]),
                          ("Hello {{name}}, you have %1$d new messages.", ["{{name}}", "%1$d"]),
                          ("Copy %s to %s and press %%.", ["%s", "%s", "%%"])]:
        out = translate(translator, source)
        for span in set(spans):
            assert out.count(span) == spans.count(span), (span, out)
    # From the evaluation set (indico): a tag aligned to part of a mask must not split it.
    out = translate(translator, "Layout reviewing ends on <strong>%(date)s</strong> at <strong>%(time)s</strong>.",
                    "html")
    assert out.count("%(date)s") == out.count("%(time)s") == 1 and out.count("<strong>") == 2, out
    out = translate(translator, "THE FILE COULD NOT BE OPENED.")
    assert out == out.upper() and out == translator.translate(["The file could not be opened."])[0].text.upper()


def test_markup_structure_attributes_entities_and_verbatim_parts(translator):
    source = ('<p class="intro">Click <a href="save.html" title="a &amp; b">the <i>save</i> button</a> &amp; '
              'wait&nbsp;a moment.</p><ul><li>Open the file.</li><li>Run <code>ls -l /tmp</code> to list files.</li>'
              '</ul><p>Line one.<br>Line two &copy; 2024.<img src="x.png" alt="X"></p>'
              '<pre>Do not translate this.</pre><p translate="no">Keep this sentence.</p>'
              '<p><span class="notranslate">Product Name</span> is ready.</p><!-- a comment -->')
    out = translate(translator, source, "html")
    assert html_tags(out) == html_tags(source)
    for verbatim in ('<code>ls -l /tmp</code>', '<pre>Do not translate this.</pre>',
                     '<p translate="no">Keep this sentence.</p>', '<span class="notranslate">Product Name</span>',
                     '<img src="x.png" alt="X">', '<a href="save.html" title="a &amp; b">', '<p class="intro">',
                     '<!-- a comment -->', "&copy;", "<br>"):
        assert out.count(verbatim) == 1, (verbatim, out)
    assert "Open the file" not in out and "2024" in out  # translated, numbers kept


def test_a_character_the_text_also_writes_as_itself_comes_back_as_itself(translator):
    """A break-it trial: one "&#10;" (here in an attribute) made every newline of the page "&#10;", in <pre> and
    between elements too. A reference whose character the text never writes as itself still comes back as written."""
    source = '<p title="a&#10;b">Save the file.</p>\n<pre>line 1\nline 2</pre>\n<p>Line two &copy; 2024.</p>'
    out = translate(translator, source, "html")
    assert out.count("&#10;") == 1 and '<p title="a&#10;b">' in out, out
    assert "</p>\n<pre>line 1\nline 2</pre>\n<p>" in out and out.count("&copy;") == 1, out


def test_html_verbatim_parts_come_back_byte_for_byte(translator):
    """A break-it trial found script, code and comment contents NFC-normalized and stripped of control characters
    (the whole text was, before parsing): "e\u0301" came back precomposed, "\x01" and "\x7f" dropped. Only the
    text to translate is normalized now."""
    verbatim = ["<script>var s='e\u0301\x01\x7f';</script>", "<code>e\u0301 \x01</code>", "<!-- e\u0301\x01 -->",
                "<pre>A\u030a\x7f</pre>"]
    out = translate(translator, "<p>Save the file.</p>" + "".join(verbatim), "html")
    for part in verbatim:
        assert out.count(part) == 1, (part, out)
    # The text to translate still is: its decomposed accent and control character give what the composed form does.
    assert (translate(translator, "<p>The cafe\u0301 is \x01open.</p>", "html")
            == translate(translator, "<p>The caf\u00e9 is open.</p>", "html"))


def test_a_bogus_comment_and_a_stray_br_end_tag_come_back_as_they_came(translator):
    """A break-it trial: "<!- x ->" came back as "<!--- x --->", and "</br>" (a line break to browsers) was
    dropped as a stray end tag."""
    out = translate(translator, "<p>Save <!- x -> the file.</p>", "html")
    assert out.count("<!- x ->") == 1 and "<!--" not in out, out
    out = translate(translator, "<p>Save the file.</br>Close the window.</p>", "html")
    assert out.count("</br>") == 1 and out.startswith("<p>") and out.endswith("</p>"), out


def test_an_inline_element_never_splits_a_word(translator):
    """A break-it trial got "Dan<i>n schließen und beenden</i>." for "Then <i>close & exit</i>.": the subword
    "n" of "Dann" aligned into the element. Each edge now takes or leaves the whole word."""
    for source in ("Then <i>close & exit</i>.", "Then <a href='#'>close the window</a>.",
                   "<p>Then <em>close</em> the <strong>file</strong> and <u>exit</u>.</p>",
                   "Press <b>Ctrl+S</b> to save the file.", "Open the <i>file</i> and <b>save</b> it."):
        out = translate(translator, source, "html")
        assert html_tags(out) == html_tags(source), out
        for edge in re.finditer(r"<[^>]*>", out):
            before, after = out[:edge.start()], out[edge.end():]
            assert not (before[-1:].isalnum() and after[:1].isalnum()), (source, out)


@pytest.mark.parametrize("tail", ["<!-- a note the page keeps", "<![CDATA[ raw data", "<? an instruction",
                                  "<!-- unterminated <b>bold</b> text", "<script>if (a<b) {x='</div>'}",
                                  "<style>body{color:red}"])
def test_an_unterminated_comment_or_script_runs_to_the_end_and_comes_back_as_it_came(translator, tail):
    """A break-it trial sent an unterminated "<!--" in format html and got "&lt;!&gt;--" back, the rest of the page
    translated as text, and an unclosed <script> or <style> came back empty. Browsers run each to the end of the
    document (eof-in-comment, eof in script data): kept verbatim."""
    source = "<p>The file could not be opened.</p>" + tail
    out = translate(translator, source, "html")
    assert out.endswith(tail) and out.count(tail) == 1, out
    assert out.startswith("<p>") and "The file could not be opened" not in out  # the paragraph is translated


def test_xml_inline_elements_and_malformed_xml(translator):
    source = '<?xml version="1.0"?><doc><title>The printer</title><para>Select <emph>the cell</emph>.</para></doc>'
    out = translate(translator, source, "xml")
    assert out.startswith('<?xml version="1.0"?>') and well_formed(out.split("?>", 1)[1])
    assert out.count("<emph>") == 1 and "<title>" in out
    with pytest.raises(InvalidRequestError, match=r"malformed XML at line 2, column \d+: mismatched tag"):
        rich_text.prepare("<doc>\n<para>Broken</doc>", "xml")
    # An element left open said "mismatched tag" at a column past the text (the root the service wraps it in).
    for text, where in (("<a>", "line 1, column 4"), ("Save <b>the file.", "line 1, column 18"),
                        ("line one\n<b>two", "line 2, column 7")):
        with pytest.raises(InvalidRequestError, match=f"an element is not closed by the end of the text \\({where}\\)"):
            rich_text.prepare(text, "xml")
    # A stray end tag named like the root the service wraps a fragment in closed that root: expat then spoke of the
    # root's end ("not closed by the end of the text", "junk after document element") instead of the tag.
    for text, column in (("Save </_nmt_fragment> the file.", 8), ("x</_nmt_fragment><b>y</b>", 4)):
        with pytest.raises(InvalidRequestError, match=f"malformed XML at line 1, column {column}: mismatched tag"):
            rich_text.prepare(text, "xml")
    out = translate(translator, "<_nmt_fragment>Save</_nmt_fragment> the file.", "xml")
    assert out.count("<_nmt_fragment>") == 1 and out.count("</_nmt_fragment>") == 1, out
    # Tab, newline and carriage return written as references in an attribute keep their meaning: written back
    # literally, the client's parser reads each as a space.
    source = '<doc><a title="one&#10;two&#9;three&#13;" alt="a\nb">Save the file.</a></doc>'
    out = translate(translator, source, "xml")
    assert ET.fromstring(out).find("a").attrib == ET.fromstring(source).find("a").attrib == {
        "title": "one\ntwo\tthree\r", "alt": "a b"}, out


def test_protected_terms_are_copied_exactly(translator):
    out = translate(translator, "Open LibreOffice Writer and save the file.", terms=("LibreOffice Writer",))
    assert out.count("LibreOffice Writer") == 1, out


def test_a_mask_the_model_drops_goes_after_its_aligned_target_token():
    # Source "Open X1 now": pieces "Open", " X1", " now"; the target dropped X1; its second token attends to X1.
    target = protect.Target.from_pieces(["▁Öffnen", "▁Sie", "▁jetzt"])
    attention = np.array([[0.9, 0.05, 0.05, 0.0], [0.1, 0.8, 0.1, 0.0], [0.0, 0.1, 0.9, 0.0]], dtype=np.float32)
    protect.restore_masks([("X1", (5, 7))], target, attention, [(0, 4), (4, 7), (7, 11)])
    assert target.text == "Öffnen Sie X1 jetzt"
    assert [target.text[s:e] for s, e in target.token_ranges] == ["Öffnen", " Sie", " jetzt"]
    twice = protect.Target.from_pieces(["▁X1", "▁und", "▁X1"])
    protect.restore_masks([("X1", (0, 2))], twice, None, [(0, 2)])
    assert twice.text == "X1 und"
    joined = protect.Target.from_pieces(["▁X", "1", "-", "Datei", "en", "▁und", "▁X", "2", "-", "Datei"])
    protect.restore_masks([("X1", (0, 2)), ("X2", (9, 11))], joined, None, [], "X1 files, X2-file")
    assert joined.text == "X1 Dateien und X2-Datei"  # the source had a space after X1, a hyphen after X2
    # Made-up masks go ("X57" is no X5, "X777" no mask at all); the missing ones are put back (evaluation set).
    made_up = protect.Target.from_pieces(["▁X", "6", "▁X", "5", "7", "▁X", "777", "▁und"])
    protect.restore_masks([("X5", (0, 2)), ("X6", (3, 5)), ("X7", (6, 8))], made_up, None, [], "X5 X6 X7")
    assert sorted(made_up.text.split()) == ["X5", "X6", "X7", "und"]
    assert protect.unmask("X57 X5 X7.", {"X5": "%s", "X7": "%X"}) == "X57 %s %X."


def test_a_mask_keeps_its_own_piece_before_punctuation(translator):
    # The vocabulary has "1." and "2,": "open X1." was "▁X", "1." and the model moved the period along with the
    # mask ("%s. konnte nicht geöffnet werden."). Cut at the mask's end, the mask is copied and the period stays.
    tokenizer = translator.tokenizer
    text = "Error in X1, line X2."
    assert tokenizer.source_pieces(text) == ["▁Error", "▁in", "▁X", "1,", "▁line", "▁X", "2."]  # what it is for
    bounds = (len("Error in X1"), len(text) - 1)
    assert tokenizer.source_pieces(text, bounds) == ["▁Error", "▁in", "▁X", "1", ",", "▁line", "▁X", "2", "."]
    spans = tokenizer.source_char_spans(text, bounds)
    assert [text[s:e].strip() for s, e in spans] == ["Error", "in", "X", "1", ",", "line", "X", "2", "."]
    assert translator.tokenize(text, bounds)[:-1] == [tokenizer.sp.piece_to_id(p)
                                                      for p in tokenizer.source_pieces(text, bounds)]
    # Boundaries where pieces end already change nothing.
    assert tokenizer.source_pieces("Open the file.", (4, 8, 13)) == tokenizer.source_pieces("Open the file.")
    assert tokenizer.source_pieces(text, ()) == tokenizer.source_pieces(text)
    prepared = rich_text.prepare("Could not open %s. Error in %s, line %d.")
    assert [s[e - 1] for s, bs in zip(prepared.sentences, prepared.boundaries) for e in bs] == ["1", "2", "3"]
    for source in ["Could not open %s.", "Unable to save %s.", "Cannot connect to %s."]:
        out = translate(translator, source)
        assert "%s." not in out and out.endswith(".") and out.count("%s") == 1, out


def test_escaped_text_stays_escaped_without_inline_elements(translator):
    # A block with nothing to mask or place took the plain path, which returned the decoded text: "A &lt;tag&gt;
    # here." came back as "A <tag> hier.", a real element, and "&amp;" as a bare "&".
    for source in ["<p>Tom &amp; Jerry &lt;img src=x onerror=alert(1)&gt;</p>", "Use &lt;b&gt; for bold."]:
        out = translate(translator, source, "html")
        assert html_tags(out) == re.findall(r"<(\w+)", source), out
        text = re.sub(r"</?p>", "", out)  # the text between the source's own tags: escaped
        assert "<" not in text and ">" not in text and re.fullmatch(r"(?:[^&]|&(?:amp|lt|gt);)*", text), out
        well_formed(translate(translator, source, "xml"))


def test_emoji_are_masked_and_come_back_while_other_unknowns_go_through_unk(translator):
    """Emoji in the vocabulary's unknown ranges are masked (the model dropped each of these sentences' emoji);
    accents and other scripts, which the model copies through its unk token, are not."""
    text = "Mixed 中文 and Andrè 🧑\u200d💻 here 👍🏽!"
    found = protect.find_spans(text, (), translator.tokenizer.unknown_source_spans(text))
    assert [(s.text(text), s.kind) for s in found] == [("🧑\u200d💻", "emoji"), ("👍🏽", "emoji")]
    assert protect.find_spans("a \u200d b", (), [(2, 3)]) == []  # a joiner alone is no emoji
    for source, emoji in [("The paper was rejected on account of 😀 its length.", "😀"),
                          ("You 🚀 can change these settings.", "🚀"),
                          ("<p>That group name or ID does not 🧑\u200d💻 exist.</p>", "🧑\u200d💻")]:
        out = translate(translator, source, "html" if source.startswith("<") else "text")
        assert out.count(emoji) == 1, (source, out)


def test_emoji_at_a_sentences_edges_stay_out_of_the_models_input(translator):
    """An emoji mask at a sentence's start or end is not translated: the model translates the sentence as if it
    were not there (a mask at the start changed the words after it) and a streamed sentence record carries it."""
    source = "🎉 You can change these settings. Save the file 👍🏽\n\n✅ Done 🚀 now."
    prepared = rich_text.prepare(source, "text", True, (), translator.tokenizer.unknown_source_spans)
    assert prepared.sentences[:2] == ["You can change these settings.", "Save the file"]
    assert re.fullmatch(r"Done X\d now\.", prepared.sentences[2])  # in the middle: masked, for the model to place
    clean = translate(translator, "You can change these settings. Save the file")
    out = translate(translator, source)
    assert out.startswith(f"🎉 {clean} 👍🏽\n\n✅ ") and out.count("🚀") == 1, out
    hyps = translator.translate_ids([translator.tokenize(s, b) for s, b in zip(prepared.sentences,
                                                                               prepared.boundaries)],
                                    dataclasses.replace(translator.default_options, return_attention=True))
    records = [prepared.render_sentence(j, h[0], translator.tokenizer, []) for j, h in enumerate(hyps)]
    assert records[0].startswith("🎉 ") and records[1].endswith(" 👍🏽") and records[2].startswith("✅ ")


def test_emoji_beside_digits_and_inside_urls_or_placeholders(translator):
    """An emoji inside a URL or placeholder stays part of it (it took the URL's protection away); digits right after
    an emoji go with its mask ("🥇1st" read as mask "X11" and lost "1st"); the edges of a sentence are found in one
    pass over it."""
    spans = translator.tokenizer.unknown_source_spans
    for text, want in [("See https://example.com/blog/happy-🎉 for the photos.",
                        [("https://example.com/blog/happy-🎉", "url")]),
                       ("Hello {🎉} and 🎉", [("{🎉}", "braces"), ("🎉", "emoji")]),
                       ("🥇1st place", [("🥇1st", "emoji")]),
                       ("⭐5 stars", [("⭐", "emoji"), ("5", "number")])]:
        assert [(s.text(text), s.kind) for s in protect.find_spans(text, (), spans(text))] == want, text
    for source in ["🥇1st place", "Room 🛏2B is free", "Download it from https://shop.example.com/🎁/card today."]:
        out = translate(translator, source)
        for kept in ("🥇1st", "🛏2B", "https://shop.example.com/🎁/card"):
            assert kept not in source or kept in out, (source, out)
    masks = {"X1", "X2", "X12"}
    assert rich_text._edges("X1 X12 Hi there X2", masks) == ("X1 X12 ", "Hi there", " X2")
    assert rich_text._edges("X1 X2", masks) == ("X1 ", "X2", "")  # the model always gets a sentence
    assert rich_text._edges("aX1 b X12", masks) == ("", "aX1 b", " X12")
    assert rich_text._edges("X1" + " " * 50_000 + "a b", masks) == ("X1" + " " * 50_000, "a b", "")


def test_split_at_boundaries_cuts_only_into_known_pieces():
    from engine.tokenizer import split_at_boundaries

    text = "see X12.:"
    pieces = [("▁see", (0, 3)), ("▁X", (3, 5)), ("12.:", (5, 9))]
    known = {"▁see", "▁X", "12.:", "12", ".:", ".", ":", "12."}.__contains__
    assert split_at_boundaries(pieces, text, (7, 8), known) == [
        ("▁see", (0, 3)), ("▁X", (3, 5)), ("12", (5, 7)), (".", (7, 8)), (":", (8, 9))]
    assert split_at_boundaries(pieces, text, (7,), {"12.:", "12"}.__contains__) == pieces  # "." unknown
    assert split_at_boundaries(pieces, text, (6,), known) == pieces  # "1" unknown
    assert split_at_boundaries(pieces, text, (), known) is pieces


def test_spans_found_and_not_found():
    text = ("See https://example.org/a?b=1, mail me@example.com, open /usr/share/doc or C:\\Temp\\x.txt, "
            "$HOME and ${USER}, %5.2f %-10s %(n)d %1 {0} {{count}}, on 2024-05-01 at 10:30, v1.2.3, 42 and 3,5.")
    found = [s.text(text) for s in protect.find_spans(text)]
    assert found == ["https://example.org/a?b=1", "me@example.com", "/usr/share/doc", "C:\\Temp\\x.txt", "$HOME",
                     "${USER}", "%5.2f", "%-10s", "%(n)d", "%1", "{0}", "{{count}}", "2024-05-01", "10:30", "v1.2.3",
                     "42", "3,5"]
    text = "I am 100% sure, and/or not."  # no "% s" placeholder, no "/or" path: only the number
    assert [s.text(text) for s in protect.find_spans(text)] == ["100"]


_INLINE = st.sampled_from(["b", "i", "a", "span", "em"])
_PLACEHOLDERS = st.sampled_from(["%s", "%d", "%(name)s", "{0}", "{count}", "{{user}}", "%1$s", "42", "2024-05-01"])


@st.composite
def tagged_sentences(draw):
    words = draw(st.sampled_from(SENTENCES[:4])).rstrip(".").split()
    for _ in range(draw(st.integers(0, 3))):
        words.insert(draw(st.integers(0, len(words))), draw(_PLACEHOLDERS))
    out, i = [], 0
    while i < len(words):
        if draw(st.booleans()) and i + 1 < len(words):
            n = draw(st.integers(1, min(3, len(words) - i)))
            tag = draw(_INLINE)
            inner = " ".join(words[i:i + n])
            if n > 1 and draw(st.booleans()):
                nested = draw(_INLINE)
                inner = f"{words[i]} <{nested}>{' '.join(words[i + 1:i + n])}</{nested}>"
            attributes = ' href="#"' if tag == "a" else ""
            out.append(f"<{tag}{attributes}>{inner}</{tag}>")
            i += n
        else:
            out.append(words[i])
            i += 1
    return " ".join(out) + "."


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(source=tagged_sentences())
def test_random_tag_and_placeholder_nestings_stay_well_formed_with_every_placeholder(translator, source):
    out = translate(translator, source, "html")
    root, expected = well_formed(out), well_formed(source)
    assert [e.tag for e in root.iter()] == [e.tag for e in expected.iter()], (source, out)
    plain = "".join(expected.itertext())
    for span in {s.text(plain) for s in protect.find_spans(plain)}:
        assert "".join(root.itertext()).count(span) == plain.count(span), (span, source, out)


def _placement_by_loops(tokens: list, a: int, b: int, text_len: int) -> tuple[int, int]:
    """Where an element over source [a, b) goes, by the loops _Alignment replaced (its reference): the hull of the
    tokens aligned into it, else the token giving it the most attention, else after the last token aligned before
    it."""
    hits = [(s, e) for s, e, aligned, _, _ in tokens if aligned and a < b and aligned[0] < b and a < aligned[1]]
    if not hits and a < b:
        best, best_mass = None, 0.0
        for s, e, aligned, row, ranges in tokens:
            if row is None:
                continue
            mass = float(sum(row[j] for j, (rs, re_) in enumerate(ranges) if rs < b and a < re_))
            if mass > best_mass:
                best, best_mass = (s, e), mass
        hits = [best] if best else []
    if hits:
        return min(s for s, _ in hits), max(e for _, e in hits)
    before = [e for s, e, aligned, _, _ in tokens if aligned and aligned[1] <= a]
    start = max(before) if before else (0 if a == 0 else text_len)
    return start, start


@pytest.mark.parametrize("seed", range(30))
def test_alignment_places_elements_where_the_per_token_loops_did(seed):
    """Random runs: sentences of source pieces (some without attention, as when casing changed a sentence's
    length), target tokens aligned to an argmax piece or not, attention rows with exact ties and zero rows; every
    source range [a, b) of the run, empty ones included, lands where the former loops put it."""
    rng = np.random.default_rng(seed)
    tokens, source, output = [], 0, 0
    for _ in range(int(rng.integers(1, 5))):
        n_pieces = int(rng.integers(1, 6))
        bounds = np.cumsum(rng.integers(1, 4, n_pieces + 1))
        ranges = [(source + int(bounds[i]), source + int(bounds[i + 1])) for i in range(n_pieces)]
        source = ranges[-1][1] + int(rng.integers(0, 3))
        attended = rng.random() < 0.8
        for _ in range(int(rng.integers(0, 6))):
            width = int(rng.integers(1, 4))
            row = rng.choice([0.0, 0.25, 0.5], size=n_pieces + 1).astype(np.float32)  # ties, eos column last
            aligned = ranges[int(np.argmax(row[:n_pieces]))] if attended and rng.random() < 0.85 else None
            tokens.append((output, output + width, aligned, row if aligned else None, ranges))
            output += width + int(rng.integers(0, 2))
    alignment = rich_text._Alignment(tokens)
    for a in range(source + 2):
        for b in range(a, source + 3):
            hull = alignment.hull(a, b) if a < b else None
            if hull is None:
                before = alignment.end_before(a)
                start = before if before is not None else (0 if a == 0 else output)
                hull = (start, start)
            assert hull == _placement_by_loops(tokens, a, b, output), (a, b)


def test_alignment_breaks_attention_ties_by_the_first_token():
    """Two sentences' tokens, neither aligned into source [3, 8), each giving the piece of it in its sentence a
    quarter of its attention: the element goes to the first token, as the former loops' strict ">" had it."""
    first, second = [(0, 2), (3, 5)], [(6, 8), (9, 11)]
    tokens = [(0, 4, first[0], np.asarray([0.5, 0.25, 0.25], dtype=np.float32), first),
              (5, 9, second[1], np.asarray([0.25, 0.5, 0.25], dtype=np.float32), second)]
    alignment = rich_text._Alignment(tokens)
    assert alignment.hull(3, 8) == (0, 4) == _placement_by_loops(tokens, 3, 8, 9)
    assert alignment.hull(6, 8) == (5, 9) == _placement_by_loops(tokens, 6, 8, 9)


def test_many_inline_elements_render_in_place(translator):
    """A block of 400 inline elements (each word its own): every element is in the output, well-formed, in order."""
    source = " ".join(f"<b>{w}</b>" for w in ("Save the file before you close the window.".split() * 50))
    out = translate(translator, f"<p>{source}</p>", "html")
    assert html_tags(out) == ["p"] + ["b"] * 400


def test_script_and_style_content_comes_back_byte_for_byte(translator):
    """Raw-text elements: html.parser hands their content over undecoded, and it must not be escaped back
    ("a && b" became "a &amp;&amp; b", which breaks the script)."""
    script, style = "<script>if (a && b < c) { x = '<p>'; }</script>", "<style>div > p { color: red }</style>"
    out = translate(translator, f"{script}{style}<p>Save the file.</p>", "html")
    assert out.startswith(script + style) and out.endswith("</p>") and "Datei" in out


def test_optional_end_tags_close_as_browsers_close_them(translator):
    """<li>, <td>, <tr> and <p> without end tags are siblings (HTML's optional end tags), written back as they
    came; 250 such items are a list, not markup nested 250 deep (a 422 before)."""
    from engine import markup

    def names(element):
        return [c.name for c in element.children if isinstance(c, markup.Element)]

    source = "<ul><li>Save the file.<li>Open the door.<li>Close the window.</ul><p>One.<p>Two.<div>Three.</div>"
    root, _ = markup.parse_html(source)
    assert names(root) == ["ul", "p", "p", "div"] and names(root.children[0]) == ["li", "li", "li"]
    table, _ = markup.parse_html("<table><tr><td>Save<td>Open<tr><td>Close</table>")
    assert [len(names(tr)) for tr in table.children[0].children] == [2, 1]
    out = translate(translator, source, "html")
    assert out.count("<li>") == 3 and "</li>" not in out and out.count("<p>") == 2
    items = "<ul>" + "".join(f"<li>Item {i} is here." for i in range(250)) + "</ul>"
    assert translate(translator, items, "html").count("<li>") == 250


def test_an_xml_fragment_is_parsed_as_the_text_around_its_elements(translator):
    """Text with elements but no single root, as DeepL's tag_handling "xml" takes it; a fragment that is not
    well-formed still says where, in the text's own columns."""
    out = translate(translator, "Press <b>Ctrl+S</b> to save the file.", "xml")
    assert out.count("<b>") == 1 and well_formed(out).find("b") is not None
    two = translate(translator, "<p>Save the file.</p><p>Close the window.</p>", "xml")
    assert len(well_formed(two).findall("p")) == 2
    with pytest.raises(InvalidRequestError, match=r"malformed XML at line 1, column 16: mismatched tag"):
        rich_text.prepare("Press <b>Ctrl</i>", "xml")


def test_protected_terms_match_whole_words_only():
    text = "The password is stored in the settings. Open LibreOffice. Use C++11 or C++."
    found = [(s.text(text), s.kind) for s in protect.find_spans(text, ("pass", "set", "e", "LibreOffice", "C++"))]
    assert found == [("LibreOffice", "term"), ("C++", "term"), ("11", "number"), ("C++", "term")]


@pytest.mark.parametrize("source", ["<p>Save <![CDATA[x < y]]> the file.</p>", "<![if !IE]><p>Save.</p><![endif]>",
                                    "<ul><li>a<li>b</ul><p>c<p>d", "<script>a && b</script>"])
def test_html_that_is_not_translated_round_trips_exactly(source):
    """Parsed and written back unchanged (CDATA lost a "]" before: html.parser hands it over as "CDATA[x")."""
    from engine import markup

    root, references = markup.parse_html(source)
    assert markup.serialize(root, references) == source
