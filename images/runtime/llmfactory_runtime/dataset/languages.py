"""Which language a prompt is in: py3langid's model (shipped in the package, offline), limited to
the languages the build asks for. Short prompts are hard to tell apart among 97 languages
("Напиши стихотворение о весне" reads as Bulgarian); among ru/en/zh they are easy, which is why
the candidates default to the keys of samplesPerLanguage. Accuracy: benchmarks/language_id.py."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..task import InvalidTask
from .sources import Drops


def identifier(candidates: list[str]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # noqa: PLC0415

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    unknown = sorted(set(candidates) - set(ident.nb_classes))
    if unknown:
        raise InvalidTask(f"spec.languageDetection.candidates: {', '.join(unknown)} unknown to the language "
                          f"model; it knows {', '.join(sorted(ident.nb_classes))}")
    if candidates:
        ident.set_languages(candidates)
    return ident


def detect(prompts: Iterable[dict[str, Any]], spec: dict[str, Any], wanted: dict[str, int] | None,
           drops: Drops) -> Iterator[dict[str, Any]]:
    """Prompts with their detected language, as they come; those detected with too little confidence
    dropped."""
    ident = identifier(spec.get("candidates") or sorted(wanted or {}))
    for p in prompts:
        lang, confidence = ident.classify(p["turns"][0])
        if confidence < spec.get("minConfidence", 0.5):
            drops.add("language_uncertain", p["turns"][0])
            continue
        yield {**p, "language": lang, "languageConfidence": round(float(confidence), 3)}
