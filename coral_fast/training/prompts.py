"""The prompt set for self-distillation: instructions written for this project.

`build_prompts()` composes them from hand-written templates and topics (explanations, code, lists,
math word problems with fresh numbers, rewriting, dialogue, advice, comparisons, short creative
writing) and is deterministic; `coral_fast/data/prompts.jsonl` is its output, one JSON object a line:
``{"id": int, "category": str, "split": "train"|"eval", "messages": [{"role": "user", "content": str}, ...]}``.

Regenerate with ``python -m coral_fast.training.prompts`` (writes the shipped file).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"

SCIENCE = [
    "photosynthesis", "gravity", "black holes", "vaccines", "plate tectonics", "the water cycle",
    "DNA replication", "the greenhouse effect", "electricity", "magnetism", "evolution by natural selection",
    "the immune system", "rainbows", "tides", "the speed of light", "earthquakes", "volcanoes",
    "the seasons", "sound waves", "nuclear fusion", "antibiotics", "the human heart", "sleep",
    "climate change", "the periodic table", "friction", "lightning", "the moon's phases", "ocean currents",
    "cell division", "the nervous system", "batteries", "solar panels", "the Big Bang", "entropy",
]
TECH = [
    "the internet", "a CPU cache", "public-key cryptography", "machine learning", "a hash table",
    "version control with git", "cloud computing", "a compiler", "recursion", "an operating system",
    "a database index", "neural networks", "HTTP", "binary numbers", "garbage collection", "Wi-Fi",
    "GPS", "blockchains", "unit testing", "APIs", "sorting algorithms", "virtual memory", "DNS",
    "containers like Docker", "open-source software", "spreadsheets", "search engines", "email",
]
SOCIETY = [
    "inflation", "supply and demand", "democracy", "the printing press", "the Industrial Revolution",
    "the Roman Empire", "the Renaissance", "taxes", "interest rates", "the stock market", "recycling",
    "urbanization", "the Silk Road", "the invention of writing", "public libraries", "the Olympic Games",
    "minimum wage", "renewable energy", "insurance", "trade between countries", "the scientific method",
]
EVERYDAY = [
    "learning a new language", "saving money", "cooking rice", "starting to run", "keeping houseplants alive",
    "writing a resume", "preparing for a job interview", "studying for exams", "reducing stress",
    "organizing a small kitchen", "planning a trip", "making friends in a new city", "drinking enough water",
    "getting better sleep", "learning to play the guitar", "taking care of a puppy", "public speaking",
    "time management", "baking bread", "staying focused while working from home", "reading more books",
]
ALL_TOPICS = SCIENCE + TECH + SOCIETY + EVERYDAY

EXPLAIN = [
    "Explain {t} in simple terms.",
    "Can you explain how {t} works?",
    "Explain {t} to a ten-year-old.",
    "What is {t}? Give a short explanation.",
    "Describe {t} in three sentences.",
    "Why is {t} important?",
    "Give me a brief overview of {t}.",
    "What are the main ideas behind {t}?",
    "I never understood {t}. Could you help me understand it?",
    "Summarize what someone should know about {t}.",
]
LISTS = [
    "List five facts about {t}.",
    "Give me three interesting things about {t}.",
    "What are some common misconceptions about {t}?",
    "List the pros and cons of {t}.",
    "Give me a numbered list of tips for {t}.",
    "What are four questions a student might ask about {t}?",
]
ADVICE = [
    "Give me some tips for {t}.",
    "What is a good way to get started with {t}?",
    "I want to get better at {t}. Where should I begin?",
    "What mistakes do beginners make with {t}?",
    "Write a short step-by-step plan for {t}.",
]
COMPARE_PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("Python", "JavaScript"), ("renting", "buying a home"),
    ("trains", "planes"), ("e-books", "paper books"), ("running", "swimming"), ("solar power", "wind power"),
    ("a laptop", "a desktop computer"), ("summer", "winter"), ("lists", "tuples in Python"),
    ("weather", "climate"), ("viruses", "bacteria"), ("speed", "velocity"), ("mitosis", "meiosis"),
    ("TCP", "UDP"), ("stocks", "bonds"), ("a lake", "a sea"), ("introverts", "extroverts"),
    ("RAM", "storage"), ("a simile", "a metaphor"), ("weight", "mass"), ("city life", "country life"),
]
COMPARE = [
    "What is the difference between {a} and {b}?",
    "Compare {a} and {b}.",
    "Which is better, {a} or {b}? Explain briefly.",
    "Give two similarities and two differences between {a} and {b}.",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the vowels in a string", "finds the largest element in a list",
    "removes duplicates from a list while keeping the order", "checks whether a string is a palindrome",
    "merges two sorted lists", "converts Celsius to Fahrenheit", "computes the average of a list of numbers",
    "counts how often each word appears in a text", "flattens a nested list", "sorts a list of dictionaries by a key",
    "returns the greatest common divisor of two numbers", "checks whether two strings are anagrams",
    "implements binary search", "reads a text file and prints the number of lines", "generates a random password",
    "transposes a matrix given as a list of lists", "finds the second smallest number in a list",
    "converts a decimal number to binary", "capitalizes the first letter of every word",
    "computes the sum of the digits of an integer", "validates a simple email address",
    "rotates a list by k positions", "returns the intersection of two lists", "implements a stack class",
    "computes the running total of a list", "splits a list into chunks of size n",
]
CODE_LANGS = ["Python", "Python", "Python", "JavaScript", "C", "Java", "Rust", "Go"]
CODE = [
    "Write a {lang} function that {task}.",
    "Write a short {lang} program that {task}, with a comment explaining it.",
    "How would I write a function in {lang} that {task}?",
    "Show me {lang} code that {task}, and explain how it works.",
]
CODE_EXPLAIN = [
    "Explain what this Python code does:\n\nfor i in range(1, 11):\n    if i % 2 == 0:\n        print(i)",
    "What does this function return for n = 4?\n\ndef f(n):\n    return 1 if n <= 1 else n * f(n - 1)",
    "Find the bug in this Python code:\n\ndef average(xs):\n    return sum(xs) / len(xs) + 1",
    "Explain this SQL query:\n\nSELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY COUNT(*) DESC;",
    "What is wrong with this JavaScript?\n\nconst x = 5;\nx = 6;\nconsole.log(x);",
    "Explain list comprehensions in Python with an example.",
    "What does `git rebase` do, and when should I use it?",
    "Explain the difference between `==` and `is` in Python.",
    "What is a for loop? Show an example in Python.",
    "How do I read a CSV file in Python?",
    "Explain what a class is in object-oriented programming, with a small example.",
    "What does the `return` statement do in a function?",
]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Lena", "Marco", "Nora", "Omar", "Priya", "Sam"]
ITEMS = ["apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "stamps", "oranges", "coins"]


def _math_problem(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(8)
    a, b, c = rng.randint(3, 40), rng.randint(2, 15), rng.randint(2, 9)
    if kind == 0:
        return f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} gives away {c}. How many {item} does {name} have now?"
    if kind == 1:
        return f"A box holds {c} {item}. How many {item} are in {b} boxes? Show your work."
    if kind == 2:
        price = rng.randint(2, 20)
        return f"{name} buys {b} notebooks that cost ${price} each and pays with a ${(b * price // 10 + 1) * 10} bill. How much change does {name} get?"
    if kind == 3:
        speed, hours = rng.randint(30, 90), rng.randint(2, 6)
        return f"A car travels at {speed} km per hour for {hours} hours. How far does it go? Explain step by step."
    if kind == 4:
        total = c * b
        return f"{name} wants to share {total} {item} equally among {c} friends. How many {item} does each friend get?"
    if kind == 5:
        w, h = rng.randint(3, 20), rng.randint(3, 20)
        return f"A rectangle is {w} meters long and {h} meters wide. What are its area and its perimeter?"
    if kind == 6:
        pct = rng.choice([10, 20, 25, 30, 50])
        price = rng.randint(2, 30) * 10
        return f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price?"
    age = rng.randint(5, 15)
    return f"{name} is {age} years old. {other} is {b} years older than {name}. How old will {other} be in {c} years?"


SENTENCES = [
    "the meeting has been moved to next tuesday because many people were not available",
    "I think that we should maybe try to finish the project sooner if that is possible",
    "The cat sat on the mat and looked at the birds outside the window all afternoon.",
    "our product is good and people like it and it is cheap",
    "Due to unforeseen circumstances, the event scheduled for Saturday has been cancelled.",
    "He didn't do his homework because he was playing video games all night.",
    "The new park downtown has a playground, a small lake, and many walking paths.",
    "please send me the report as soon as you can, thanks",
    "Learning to code is hard at first but it gets easier with practice.",
    "The restaurant was crowded, the food was cold, and the waiter forgot our drinks.",
    "Our team won the game in the last minute after a great pass from the captain.",
    "Electric cars are becoming more popular because they are cheaper to run.",
    "i am writing to ask about the job you posted on your website last week",
    "The storm knocked down several trees and left the town without power for two days.",
]
REWRITE = [
    "Rewrite this sentence to be more formal: {s}",
    "Make this sentence shorter and clearer: {s}",
    "Fix the grammar and punctuation: {s}",
    "Rewrite this in a friendly, casual tone: {s}",
    "Paraphrase the following sentence: {s}",
    "Translate this sentence into simple English for a child: {s}",
    "Turn this into a polite email to a colleague: {s}",
    "Summarize this in a few words: {s}",
]
CREATIVE = [
    "Write a short poem about {t}.",
    "Write a haiku about {t}.",
    "Tell me a short story that involves {t}.",
    "Write a catchy slogan about {t}.",
    "Write a short product description for a book about {t}.",
]
CREATIVE_TOPICS = [
    "the ocean", "autumn leaves", "a lost robot", "a rainy Monday", "friendship", "the night sky", "a small village",
    "coffee", "a dragon who is afraid of fire", "a journey by train", "the first day of school", "a lighthouse",
    "mountains", "a clever fox", "the city at night", "a garden", "time travel", "a birthday party",
]
DIALOGUE_SETUPS = [
    [("Hi! I'm planning a picnic this weekend.", "That sounds lovely! Where are you thinking of going?"), "Probably the park near my house. What food should I bring?"],
    [("Can you help me with my homework?", "Of course! What subject is it?"), "It's about fractions. How do I add 1/3 and 1/4?"],
    [("I just adopted a kitten.", "Congratulations! Kittens are a lot of fun. What's its name?"), "Her name is Luna. What should I buy for her first week?"],
    [("I want to start exercising.", "Great idea! Do you have any activities you enjoy?"), "I like walking, but I get bored. Any ideas to make it fun?"],
    [("What's a good book to read?", "It depends on what you like. Fiction or non-fiction?"), "Fiction, something adventurous."],
    [("I'm nervous about my presentation tomorrow.", "That's completely normal. What is the presentation about?"), "It's about our team's sales results. How can I calm down?"],
    [("Do you know anything about astronomy?", "Yes, I can help with astronomy questions. What would you like to know?"), "Why do stars twinkle?"],
    [("I'm learning Python.", "Nice! How far along are you?"), "I know variables and loops. What should I learn next?"],
    [("My tomato plants look sick.", "I'm sorry to hear that. What do the leaves look like?"), "They have yellow spots and some are curling. What can I do?"],
    [("I'm going to Japan next month.", "How exciting! Is it your first trip there?"), "Yes. What are some customs I should know about?"],
    [("Can you recommend a dinner recipe?", "Sure! Do you have any dietary preferences?"), "I'm vegetarian and I have about thirty minutes."],
    [("I have a job interview on Friday.", "Good luck! What kind of job is it?"), "It's for a junior data analyst. What questions might they ask?"],
]
SHORT_QUESTIONS = [
    "What is the capital of France?", "How many days are there in a leap year?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Fahrenheit?", "How many continents are there? Name them.",
    "What is the largest planet in our solar system?", "What does CPU stand for?", "How many legs does a spider have?",
    "What is the square root of 144?", "What language is spoken in Brazil?", "What is 15% of 200?",
    "What is the chemical symbol for gold?", "Who painted the Mona Lisa?", "What is the tallest mountain in the world?",
    "How many minutes are in a day?", "What is the freezing point of water in Celsius?", "Name three primary colors.",
    "What is the opposite of 'generous'?", "What is a synonym for 'happy'?", "Is a tomato a fruit or a vegetable?",
    "What year did humans first land on the moon?", "What is the longest river in Africa?",
    "How do you say 'thank you' in Spanish?", "What is photosynthesis in one sentence?",
    "Convert 5 kilometers to miles.", "What is 7 times 8?", "What is the past tense of 'swim'?",
]
SYSTEM_STYLE = [
    "Answer in one paragraph.", "Keep your answer under 100 words.", "Use bullet points.", "Be concise.", "",
    "", "", "", "",
]


def build_prompts(seed: int = 0, eval_every: int = 10) -> list[dict]:
    """Compose the prompt set; every `eval_every`-th prompt (after shuffling) is held out for evaluation."""
    rng = random.Random(seed)
    out: list[tuple[str, list[dict]]] = []

    def user(category: str, text: str) -> None:
        style = rng.choice(SYSTEM_STYLE)
        content = f"{text} {style}".strip() if style and category not in ("code", "rewrite", "dialogue") else text
        out.append((category, [{"role": "user", "content": content}]))

    for topic in ALL_TOPICS:
        for template in rng.sample(EXPLAIN, 3):
            user("explanation", template.format(t=topic))
        user("list", rng.choice(LISTS).format(t=topic))
    for topic in EVERYDAY:
        for template in rng.sample(ADVICE, 3):
            user("advice", template.format(t=topic))
    for a, b in COMPARE_PAIRS:
        for template in rng.sample(COMPARE, 2):
            user("comparison", template.format(a=a, b=b))
    for task in CODE_TASKS:
        for template in rng.sample(CODE, 3):
            user("code", template.format(lang=rng.choice(CODE_LANGS), task=task))
    for text in CODE_EXPLAIN:
        user("code", text)
    for _ in range(200):
        user("math", _math_problem(rng))
    for sentence in SENTENCES:
        for template in rng.sample(REWRITE, 4):
            user("rewrite", template.format(s=sentence))
    for topic in CREATIVE_TOPICS:
        for template in rng.sample(CREATIVE, 2):
            user("creative", template.format(t=topic))
    for question in SHORT_QUESTIONS:
        user("question", question)
    for turns, last in DIALOGUE_SETUPS:
        messages = []
        for u, a in turns if isinstance(turns[0], tuple) else [turns]:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": last})
        out.append(("dialogue", messages))

    rng.shuffle(out)
    return [
        {"id": i, "category": cat, "split": "eval" if i % eval_every == eval_every - 1 else "train", "messages": msgs}
        for i, (cat, msgs) in enumerate(out)
    ]


def load_prompts(path: str | Path | None = None, split: str | None = None) -> list[dict]:
    """Read a prompts.jsonl file (the shipped set by default); `split` keeps "train" or "eval" only."""
    path = Path(path or PROMPTS_PATH)
    if not path.is_file():
        raise ValueError(f"prompts file {path} not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not valid JSON: {error}") from None
    for row in rows:
        if "messages" not in row:
            if "prompt" not in row:
                raise ValueError(f"prompt row {row.get('id')} has neither 'messages' nor 'prompt'")
            row["messages"] = [{"role": "user", "content": row["prompt"]}]
        row.setdefault("split", "train")
    return [r for r in rows if split is None or r["split"] == split]


if __name__ == "__main__":
    rows = build_prompts()
    PROMPTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    PROMPTS_PATH.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from collections import Counter

    print(len(rows), "prompts", dict(Counter(r["category"] for r in rows)), dict(Counter(r["split"] for r in rows)))
