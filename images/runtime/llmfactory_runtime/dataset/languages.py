"""Which language a prompt is in: py3langid's model (shipped in the package, offline), limited to
the languages the build asks for. Short prompts are hard to tell apart among 97 languages
("Напиши стихотворение о весне" reads as Bulgarian); among ru/en/zh they are easy, which is why
the candidates default to the keys of samplesPerLanguage. Accuracy: benchmarks/language_id.py."""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator

from ..task import InvalidTask
from .pieces import Workers, chunks, computed
from .sources import Drops

PIECE = 256  # prompts (documents) a worker classifies at a time


class UnknownLanguages(ValueError):
    """Candidates the language model does not know; the caller names the field that gave them."""


def identifier(candidates: list[str]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # noqa: PLC0415

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    unknown = sorted(set(candidates) - set(ident.nb_classes))
    if unknown:
        raise UnknownLanguages(f"{', '.join(unknown)} unknown to the language model; it knows "
                               f"{', '.join(sorted(set(ident.nb_classes)))}")
    if candidates:
        ident.set_languages(candidates)
    return ident


@functools.lru_cache(maxsize=4)
def _identifier(candidates: tuple[str, ...]):
    """This process's identifier for the candidates (a worker's, loaded once)."""
    return identifier(list(candidates))


def classified(candidates: tuple[str, ...], texts: list[str]) -> list[tuple[str, float]]:
    """(language, confidence) of each text, among the candidates (all the model knows when none)."""
    ident = _identifier(candidates)
    return [(lang, float(confidence)) for lang, confidence in map(ident.classify, texts)]


def detect(prompts: Iterable[dict[str, Any]], spec: dict[str, Any], wanted: dict[str, int] | None,
           drops: Drops, workers: Workers | None = None, hold: bool = False) -> Iterator[dict[str, Any]]:
    """Prompts with their detected language, as they come (classified by the workers' processes,
    when given); those detected with too little confidence dropped. The model (~50 MB) is let go
    when they end, unless `hold` (a text build's next segment reads with it; release() then)."""
    candidates = tuple(spec.get("candidates") or sorted(wanted or {}))
    try:
        _identifier(candidates)  # unknown candidates are refused before any prompt is read
    except UnknownLanguages as exc:
        field = "spec.languageDetection.candidates" if spec.get("candidates") else "spec.samplesPerLanguage"
        raise InvalidTask(f"{field}: {exc}") from None
    try:
        for piece, found in computed(chunks(prompts, PIECE), functools.partial(classified, candidates),
                                     lambda p: p["turns"][0], workers):
            for p, (lang, confidence) in zip(piece, found):
                if confidence < spec.get("minConfidence", 0.5):
                    drops.add("language_uncertain", p["turns"][0])
                    continue
                yield {**p, "language": lang, "languageConfidence": round(confidence, 3)}
    finally:
        if not hold:
            release()


def release() -> None:
    """This process's language model let go: not held through the stages after detection."""
    _identifier.cache_clear()
