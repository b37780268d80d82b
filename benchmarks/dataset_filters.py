"""Benchmark the DatasetBuild's prompt and answer filters on synthetic conversations (English,
Russian and Chinese; some refusals, some near-duplicate prompts): rows/s of each stage as the
build runs it.

    .venv/bin/python benchmarks/dataset_filters.py [rows]
"""

from __future__ import annotations

import random
import sys
import time

from llmfactory_runtime.dataset.dedupe import dedupe
from llmfactory_runtime.dataset.filters import AnswerFilter
from llmfactory_runtime.dataset.languages import detect
from llmfactory_runtime.dataset.sources import Drops

WORDS = {"en": "the river model data city music light winter garden question answer system story market".split(),
         "ru": "река модель данные город музыка свет зима сад вопрос ответ система история рынок".split(),
         "zh": list("河模型数据城市音乐光冬天花园问题答案系统故事市场")}
TEMPLATES = {"en": "Explain {} and {} in a few sentences, with an example about {}.",
             "ru": "Объясни {} и {} в нескольких предложениях, с примером про {}.",
             "zh": "请用几句话解释{}和{}，并举一个关于{}的例子。"}
REFUSALS = {"en": "I'm sorry, but I can't help with that.", "ru": "Извините, я не могу помочь с этим.",
            "zh": "抱歉，我无法帮助你。"}


def synthetic(rows: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, bool, int]]]:
    rng = random.Random(seed)
    prompts, answers = [], []
    for i in range(rows):
        lang = ("en", "ru", "zh")[i % 3]
        words = WORDS[lang]
        text = TEMPLATES[lang].format(*(rng.choice(words) + str(rng.randrange(10_000)) for _ in range(3)))
        if prompts and rng.random() < 0.1:  # a near-duplicate of an earlier prompt
            text = rng.choice(prompts)["turns"][0].rstrip(".。") + "!"
        prompts.append({"turns": [text], "system": None, "language": lang})
        sep = "" if lang == "zh" else " "
        answer = REFUSALS[lang] if rng.random() < 0.05 else sep.join(rng.choices(words, k=60))
        answers.append((answer, True, 60))
    return prompts, answers


def timed(stage, rows: int, fn) -> tuple[str, int, float, int]:
    drops = Drops()
    start = time.perf_counter()
    kept = fn(drops)
    return stage, rows, time.perf_counter() - start, rows - kept


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    prompts, answers = synthetic(rows)
    keep = AnswerFilter({})
    results = [
        timed("answer filters (refusal, length, truncation)", rows,
              lambda drops: sum(keep.reason_to_drop(*a) is None for a in answers)),
        timed("exact duplicate prompts", rows, lambda drops: len(list(dedupe(prompts, None, drops)))),
        timed("near-duplicate prompts (MinHash LSH, 0.85)", rows, lambda drops: len(list(dedupe(prompts, 0.85, drops)))),
        timed("language detection (py3langid, en/ru/zh)", rows,
              lambda drops: len(list(detect(prompts, {"minConfidence": 0.5}, {"en": rows, "ru": rows, "zh": rows},
                                            drops)))),
    ]
    print(f"{rows} synthetic conversations (en/ru/zh, ~5% refusals, ~10% near-duplicate prompts)")
    print(f"{'stage':48} {'seconds':>8} {'rows/s':>10} {'dropped':>8}")
    for stage, n, seconds, dropped in results:
        print(f"{stage:48} {seconds:>8.2f} {n / seconds:>10,.0f} {dropped:>8}")


if __name__ == "__main__":
    main()
