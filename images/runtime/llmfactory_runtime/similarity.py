"""How alike an answer is to its reference answer, 0-1 (grader operation similarity, grader.metric), as
OpenAI's text_similarity grader scores one: for answers no string check can pass or fail, such as a
translation or a summary.

BLEU and chrF are sacrebleu's sentence scores (the reference implementation), ROUGE rouge_score's
F-measures (ROUGE-1 to -5 of shared n-grams, and -L of the longest common subsequence), GLEU nltk's sentence GLEU,
METEOR nltk's (the one Hugging Face evaluate's meteor runs: words matched exactly, then by Porter stem, then as
WordNet 3.0 synonyms), fuzzy difflib's ratio. Text in any language: chrF reads characters; BLEU tokenizes as sacrebleu's zh
where the reference has Chinese characters (13a elsewhere); ROUGE and GLEU read words and each CJK
character as a token (rouge_score's own tokenizer keeps a-z and 0-9 only, so Russian or Chinese
would score 0); so does METEOR, whose stems and synonyms are English ones (other languages match exactly).
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Each CJK character a token (they are written without spaces), else a run of other word characters.
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])\\w)+")


class _Tokenizer:
    """rouge_score's tokenizer interface: casefolded words, each CJK character a word of its own."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.casefold())


@functools.cache
def _wordnet():
    """WordNet 3.0 from nltk's data path (the runtime image's and `make`'s virtualenv have it:
    scripts/fetch_wordnet.py), read once a process; None where it is not."""
    import nltk.data  # noqa: PLC0415 - only for meteor
    from nltk.corpus.reader.wordnet import WordNetCorpusReader  # noqa: PLC0415

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    with warnings.catch_warnings():  # that it has no other languages' wordnets (Open Multilingual Wordnet): unused
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(root, None)


def missing(metric: str) -> str | None:
    """What scoring by metric needs that this process lacks, in a sentence; None when it has it all."""
    if metric == "meteor" and _wordnet() is None:
        import nltk.data  # noqa: PLC0415

        return ("meteor matches synonyms by WordNet 3.0, which is not in nltk's data path "
                f"({', '.join(nltk.data.path)}): the runtime image has it; elsewhere run "
                "`python scripts/fetch_wordnet.py <virtualenv>/share/nltk_data` or nltk.download('wordnet')")
    return None


@functools.cache
def _rouge(metric: str):
    from rouge_score import rouge_scorer  # noqa: PLC0415 - only for ROUGE

    return rouge_scorer.RougeScorer([metric], tokenizer=_Tokenizer())


def similarity(answer: str, reference: str, metric: str) -> float:
    """The answer's similarity to the reference by metric (fuzzy, bleu, gleu, chrf, meteor, rouge1 to
    rouge5, rougeL), 0-1."""
    if metric == "fuzzy":  # case and runs of whitespace aside
        a, b = (" ".join(text.casefold().split()) for text in (answer, reference))
        return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    if metric in ("bleu", "chrf"):
        import sacrebleu  # noqa: PLC0415 - only for bleu and chrf

        if metric == "chrf":
            return sacrebleu.sentence_chrf(answer, [reference]).score / 100
        tokenize = "zh" if _HAN.search(reference) else "13a"
        return sacrebleu.sentence_bleu(answer, [reference], tokenize=tokenize).score / 100
    tokens = _Tokenizer().tokenize
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu  # noqa: PLC0415 - only for gleu

        return sentence_gleu([tokens(reference)], tokens(answer))
    if metric == "meteor":
        from nltk.translate.meteor_score import single_meteor_score  # noqa: PLC0415 - only for meteor

        if (wordnet := _wordnet()) is None:
            raise LookupError(missing(metric))
        return single_meteor_score(tokens(reference), tokens(answer), wordnet=wordnet)
    if not metric.startswith("rouge"):  # cosine: embeddings from an endpoint, all answers at once
        raise ValueError(f"metric {metric}: embedding_similarity.cosines scores it")
    return _rouge(metric).score(reference, answer)[metric].fmeasure
