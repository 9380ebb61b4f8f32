"""Fixed prompt sets for speculative-decoding benchmarks and head training.

Three kinds, as speculation gains differ by kind: ``chat`` (open questions), ``summarize``
(copy-heavy: summarise or restate a passage of a license text that Debian installs in
/usr/share/common-licenses, read at run time), ``code`` (write or edit short Python).
``eval_prompts(kind, n)`` gives the benchmark set; ``training_prompts(n)`` a disjoint set
(other questions, other license texts, other code) for ``flashserve train-heads``.
Prompts are user messages; callers apply the model's chat template.
"""

from __future__ import annotations

from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
KINDS = ("chat", "summarize", "code")

_CHAT_EVAL = [
    "Why is the sky blue? Answer in a short paragraph.",
    "Give three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Explain what a black hole is to a ten-year-old.",
    "How do vaccines help the body fight disease?",
    "Describe a good morning routine for a busy person.",
    "What are the main causes of inflation?",
    "Write a short story about a robot who learns to paint.",
    "What should I pack for a weekend hiking trip?",
    "Explain how photosynthesis works.",
    "Why do cats purr?",
    "List some healthy breakfast ideas.",
    "How does a bicycle stay upright when moving?",
    "What is the water cycle?",
    "Give advice for someone starting their first job.",
    "Explain the rules of chess in simple terms.",
]

_CHAT_TRAIN = [
    "What makes a good friend?", "How do airplanes fly?", "Explain why the seasons change.",
    "Give me a recipe for pancakes.", "What is machine learning?", "How can I save money each month?",
    "Describe the city of Paris.", "Why is exercise important?", "What is the tallest mountain in the world?",
    "Write a poem about the ocean.", "How do plants grow?", "What is democracy?",
    "Explain how a computer works.", "Tell me about the history of the bicycle.", "How do bees make honey?",
    "What are the planets of the solar system?", "How should I prepare for a job interview?",
    "Why do leaves change color in autumn?", "What is the internet?", "Give tips for learning a new language.",
    "How does the heart pump blood?", "What is gravity?", "Write a letter to a friend about a holiday.",
    "Explain recycling to a child.", "What are the benefits of reading books?", "How do rainbows form?",
    "Describe your ideal weekend.", "What is a volcano?", "How do I make a cup of tea?",
    "What causes earthquakes?", "Explain the importance of sleep.", "What is electricity?",
]

_CODE_EVAL = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a Python function that counts the words in a text.",
    "Add a docstring and type hints to this function:\n\ndef area(width, height):\n    return width * height\n",
    "Rename the variable x to total in this code:\n\nx = 0\nfor value in values:\n    x = x + value\nprint(x)\n",
    "Write a Python function that reverses a list without using reverse().",
    "Write a Python function that finds the largest number in a list.",
    "Convert this loop into a list comprehension:\n\nsquares = []\nfor n in range(10):\n    squares.append(n * n)\n",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Fix the bug in this function:\n\ndef average(numbers):\n    return sum(numbers) / len(number)\n",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python script that reads a file and prints its lines in reverse order.",
    "Add comments to this code:\n\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
]

_CODE_TRAIN = [
    "Write a Python function that sorts a list of dictionaries by a key.",
    "Write a Python function that computes the factorial of a number.",
    "Write a Python function that capitalizes every word in a sentence.",
    "Write a Python class for a stack with push and pop.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that counts vowels in a string.",
    "Add type hints to this function:\n\ndef greet(name):\n    return 'Hello, ' + name\n",
    "Write a Python function that returns the even numbers of a list.",
    "Write a Python function that checks whether two strings are anagrams.",
    "Write a Python function that computes the sum of the digits of a number.",
    "Write a Python function that finds the second largest number in a list.",
    "Write a Python function that converts a binary string to an integer.",
]

# Passages for the summarize kind: eval and training draw from different license texts.
_EVAL_TEXTS = ("GPL-3", "Apache-2.0")
_TRAIN_TEXTS = ("MPL-2.0", "Artistic", "GFDL-1.3", "LGPL-2.1")


def _passages(names: tuple[str, ...], count: int, chars: int = 1500) -> list[str]:
    """``count`` passages of about ``chars`` characters, paragraph-aligned, spread over the texts."""
    paragraphs: list[str] = []
    for name in names:
        path = LICENSES / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the summarize prompts are passages of Debian's license "
                                    f"texts (the base-files package installs them)")
        paras = [p.strip() for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
        paragraphs += [p for p in paras if len(p) > 200]
    out: list[str] = []
    stride = max(1, len(paragraphs) // count)
    for i in range(count):
        j, text = (i * stride) % len(paragraphs), ""
        while len(text) < chars and j < len(paragraphs):
            text += paragraphs[j] + "\n\n"
            j += 1
        out.append(text.strip())
    return out


def _cycle(items: list[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def eval_prompts(kind: str, n: int) -> list[str]:
    """``n`` benchmark prompts of one kind (user messages)."""
    if kind == "chat":
        return _cycle(_CHAT_EVAL, n)
    if kind == "code":
        return _cycle(_CODE_EVAL, n)
    if kind == "summarize":
        return [f"Summarize the following passage, keeping its key terms:\n\n{p}" for p in _passages(_EVAL_TEXTS, n)]
    raise ValueError(f"unknown prompt kind {kind!r}; kinds: {', '.join(KINDS)}")


def training_prompts(n: int) -> list[str]:
    """``n`` prompts disjoint from ``eval_prompts``: chat, code and passages to restate, mixed."""
    third = max(1, n // 3)
    passages = [f"Restate the main points of this passage:\n\n{p}" for p in _passages(_TRAIN_TEXTS, third, 1000)]
    mixed = _cycle(_CHAT_TRAIN, n - 2 * third) + _cycle(_CODE_TRAIN, third) + passages
    return mixed[:n]
