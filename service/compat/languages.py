"""The language pairs a replica serves, their names, and language identification, for the LibreTranslate and DeepL
dialects (service/compat/). Codes are ISO 639-1, lower case ("en", "de"), as the artifacts' manifests write them;
each dialect spells them its own way at its edge (DeepL upper case)."""

from __future__ import annotations

import dataclasses
import functools

import pycountry
from py3langid.langid import MODEL_FILE, LanguageIdentifier


@functools.lru_cache(maxsize=None)
def language_name(code: str) -> str:
    """English name of an ISO 639-1 code ("de" -> "German"); the code itself when ISO 639 does not know it."""
    language = pycountry.languages.get(alpha_2=code.lower())
    return language.name if language is not None else code


@functools.lru_cache(maxsize=4)
def _identifier(languages: tuple[str, ...]) -> LanguageIdentifier:
    """langid.py's naive Bayes model over byte n-grams (Lui & Baldwin, ACL 2012), shipped inside py3langid (no
    download), restricted to ``languages`` (those it knows). About 1 s to load: once per process and language set,
    and only when a client asks."""
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages([code for code in languages if code in identifier.nb_classes])
    return identifier


@dataclasses.dataclass(frozen=True)
class Detection:
    language: str
    confidence: float  # probability among the served languages, 0..1


class LanguageTable:
    """The served pairs: (source, target) -> model id, the first model listed for a pair wins (the default model is
    listed first). Models whose manifest names no languages are left out."""

    def __init__(self, pairs: dict[tuple[str, str], str]) -> None:
        self.pairs = {(s.lower(), t.lower()): m for (s, t), m in pairs.items()}

    @classmethod
    def from_models(cls, languages: list[tuple[str, dict]]) -> "LanguageTable":
        """From (model id, manifest "languages" dict with "source" and "target") in priority order."""
        pairs: dict[tuple[str, str], str] = {}
        for model_id, langs in languages:
            if langs.get("source") and langs.get("target"):
                pairs.setdefault((langs["source"].lower(), langs["target"].lower()), model_id)
        return cls(pairs)

    @property
    def sources(self) -> list[str]:
        return sorted({s for s, _ in self.pairs})

    @property
    def targets(self) -> list[str]:
        return sorted({t for _, t in self.pairs})

    @property
    def languages(self) -> list[str]:
        return sorted(set(self.sources) | set(self.targets))

    def targets_of(self, source: str) -> list[str]:
        return sorted(t for s, t in self.pairs if s == source.lower())

    def model_for(self, source: str, target: str) -> str | None:
        return self.pairs.get((source.lower(), target.lower()))

    def detect(self, text: str) -> list[Detection]:
        """The served languages (sources and targets) ranked by the probability that ``text`` is in each, best
        first; ties rank a served source first. Restricted to the languages this service knows, as LibreTranslate
        restricts detection to its own: a German sentence sent to an en->de service is detected as German (and then
        refused as a source), not as the nearest source language."""
        identifier = _identifier(tuple(self.languages))
        if not identifier.nb_classes:
            return []
        return sorted((Detection(code, float(p)) for code, p in identifier.rank(text)),
                      key=lambda d: (d.confidence, d.language in self.sources), reverse=True)

