"""Language ID on short prompts (what DatasetBuild's languageDetection sees): accuracy and
coverage of py3langid among all 97 languages vs. among the requested ones, at several
confidence thresholds. The prompts were written for this benchmark (20 each in ru, en, zh,
3 to 12 words, the length of a typical chat opening).

    .venv/bin/python benchmarks/language_id.py
"""

from __future__ import annotations

import time

from llmfactory_runtime.dataset.languages import identifier

PROMPTS = {
    "en": ["Why is the sky blue?", "Explain quicksort", "How much is a ticket?", "Write a haiku about rain",
           "What is recursion?", "Translate this to French", "Give me three dinner ideas", "Is coffee bad for you?",
           "Summarise the plot of Hamlet", "How do vaccines work?", "Fix my Python code please",
           "What time zone is Tokyo in?", "Tell me a joke", "Best way to learn guitar?", "Define entropy",
           "Who painted the Mona Lisa?", "How tall is Everest?", "Plan a weekend in Rome", "What is a neural network?",
           "Compare cats and dogs as pets"],
    "ru": ["Почему небо голубое?", "Объясни быструю сортировку", "Сколько стоит билет?", "Напиши хайку о дожде",
           "Что такое рекурсия?", "Переведи это на французский", "Дай три идеи для ужина", "Вреден ли кофе?",
           "Кратко перескажи Гамлета", "Как работают вакцины?", "Исправь мой код на Python",
           "В каком часовом поясе Токио?", "Расскажи анекдот", "Как лучше учиться играть на гитаре?",
           "Дай определение энтропии", "Кто написал Мону Лизу?", "Какая высота Эвереста?",
           "Спланируй выходные в Риме", "Что такое нейронная сеть?", "Сравни кошек и собак как питомцев"],
    "zh": ["为什么天空是蓝色的？", "解释快速排序", "票多少钱？", "写一首关于雨的俳句", "什么是递归？", "把这句话翻译成法语",
           "给我三个晚餐建议", "咖啡对身体有害吗？", "概括一下哈姆雷特的情节", "疫苗是怎么起作用的？", "请修复我的Python代码",
           "东京在哪个时区？", "讲个笑话", "学吉他最好的方法是什么？", "给熵下个定义", "蒙娜丽莎是谁画的？", "珠穆朗玛峰有多高？",
           "计划一个罗马周末", "什么是神经网络？", "比较猫和狗作为宠物"],
}


def measure(candidates: list[str], threshold: float) -> tuple[float, float, float]:
    ident = identifier(candidates)
    kept = correct = 0
    start = time.perf_counter()
    for lang, texts in PROMPTS.items():
        for text in texts:
            found, confidence = ident.classify(text)
            if confidence >= threshold:
                kept += 1
                correct += found == lang
    elapsed = time.perf_counter() - start
    total = sum(len(t) for t in PROMPTS.values())
    return correct / max(kept, 1), kept / total, total / elapsed


def main() -> None:
    print(f"{'candidates':<14} {'minConfidence':>13} {'accuracy':>9} {'kept':>6} {'prompts/s':>10}")
    for name, candidates in (("all 97", []), ("ru, en, zh", ["ru", "en", "zh"])):
        for threshold in (0.0, 0.5, 0.9):
            accuracy, kept, speed = measure(candidates, threshold)
            print(f"{name:<14} {threshold:>13.1f} {accuracy:>9.1%} {kept:>6.0%} {speed:>10.0f}")


if __name__ == "__main__":
    main()
