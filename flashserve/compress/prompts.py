"""Fixed prompt sets: distillation training text, held-out drafting prompts, cascade questions.

Each set is built from topics crossed with request templates, so it is diverse, reproducible and
free of any outside data. The three sets share no topic. Chat prompts are user messages (the
caller applies the model's chat template); plain prompts are text to continue.
"""

from __future__ import annotations

TRAIN_TOPICS = (
    "the ocean", "volcanoes", "the Roman Empire", "photosynthesis", "honey bees", "the moon landing",
    "chess", "rainforests", "the printing press", "electricity", "coffee", "the human heart",
    "glaciers", "jazz music", "the Silk Road", "black holes", "bread baking", "earthquakes",
    "the internet", "penguins", "ancient Egypt", "solar energy", "the immune system", "bicycles",
    "libraries", "the water cycle", "dinosaurs", "mountain climbing", "vaccines", "the stock market",
    "origami", "the French Revolution", "recycling", "whales", "clocks", "the Great Wall of China",
    "gardening", "thunderstorms", "the alphabet", "submarines", "tea ceremonies", "migration of birds",
    "the periodic table", "trains", "friendship", "deserts", "the violin", "public parks",
)
HELDOUT_TOPICS = (
    "lighthouses", "coral reefs", "the telescope", "maple syrup", "the Olympic games", "windmills",
    "octopuses", "paper money", "the Renaissance", "hot air balloons", "caves", "the postal service",
    "sunflowers", "robots", "the Arctic", "pottery",
)
CHAT_TEMPLATES = (
    "Write a short story about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "What are three interesting facts about {topic}?",
    "Write a short poem about {topic}.",
    "Give me a brief history of {topic}.",
    "What would a day without {topic} look like?",
)
PLAIN_TEMPLATES = (
    "Here is a short essay about {topic}.\n\n",
    "The most surprising thing about {topic} is",
    "Chapter 1\n\nEveryone in the village had an opinion about {topic}.",
)

# Short questions with one expected answer: the cascade's fixed evaluation set.
CASCADE_QUESTIONS = (
    "What is the capital of France?", "How many days are in a week?", "What color is the sky on a clear day?",
    "What is 7 times 8?", "Which planet is known as the Red Planet?", "What is the freezing point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "How many legs does a spider have?", "What is the largest ocean on Earth?",
    "What gas do plants absorb from the air?", "What is the square root of 81?", "In which continent is Kenya?",
    "What is the opposite of hot?", "How many minutes are in an hour?", "What is the chemical symbol for gold?",
    "Which animal is known as the king of the jungle?", "What is the tallest mountain in the world?",
    "How many sides does a triangle have?", "What language is spoken in Brazil?", "What is 15 plus 27?",
    "Which organ pumps blood through the body?", "What is the largest planet in the solar system?",
    "What do bees make?", "How many continents are there?", "What is the boiling point of water in Fahrenheit?",
    "Who painted the Mona Lisa?", "What is the currency of Japan?", "What is the plural of mouse?",
    "Which month comes after June?", "What is H2O commonly called?", "How many hours are in a day?",
    "What is the capital of Italy?", "Name a primary color.", "What is 100 divided by 4?",
    "Which bird is a symbol of peace?", "What is the main ingredient of guacamole?", "How many players are on a soccer team?",
    "What is the fastest land animal?", "What shape has four equal sides?", "What is the capital of Canada?",
    "Which season comes after winter?", "What is the largest mammal?", "How many letters are in the English alphabet?",
    "What instrument has 88 keys?", "What is the smallest prime number?", "Which star is closest to Earth?",
    "What do caterpillars turn into?", "What is the capital of Germany?",
)


def _cross(topics: tuple[str, ...]) -> tuple[list[str], list[str]]:
    chat = [t.format(topic=topic) for topic in topics for t in CHAT_TEMPLATES]
    plain = [t.format(topic=topic) for topic in topics for t in PLAIN_TEMPLATES]
    return chat, plain


def training_prompts() -> tuple[list[str], list[str]]:
    """(chat user messages, plain texts) for generating distillation data: 288 + 144 prompts."""
    return _cross(TRAIN_TOPICS)


def heldout_prompts() -> tuple[list[str], list[str]]:
    """(chat, plain) prompts on topics the training set never uses (validation, draft acceptance)."""
    return _cross(HELDOUT_TOPICS)
