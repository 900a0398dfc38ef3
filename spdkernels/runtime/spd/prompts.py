"""The prompt set the PDM is trained on: the target's own continuations of these prompts are the training
text. A mix of code, instructions, editing a given text, summarising a given text, and open chat, built
from templates and word lists written for this package. None of the demo's prompts (or its texts) is here,
so the demo measures the drafter on prompts it has not seen."""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "merges two sorted lists", "counts the vowels in a sentence", "removes duplicates from a list while keeping "
    "the order", "finds the largest element of a list", "converts Celsius to Fahrenheit", "checks whether a word "
    "is a palindrome", "flattens a nested list", "computes the factorial of n", "returns the median of a list",
    "splits a list into chunks of size k", "computes the greatest common divisor of two numbers",
    "parses a date string in the format YYYY-MM-DD", "reads a CSV file and returns its rows as dictionaries",
    "sorts a list of dictionaries by a key", "returns the most common word in a text", "validates an email "
    "address with a regular expression", "implements binary search", "rotates a matrix by 90 degrees",
    "counts the lines of a text file", "implements a stack with push and pop", "computes the sum of the digits "
    "of a number", "checks whether two strings are anagrams", "returns all subsets of a set",
    "converts a Roman numeral to an integer", "implements bubble sort", "finds the second largest number",
    "capitalises the first letter of every word", "computes the running average of a stream of numbers",
    "transposes a matrix", "groups words by their first letter", "checks whether brackets are balanced",
    "returns the intersection of two lists", "converts a number to binary", "computes compound interest",
    "generates a random password", "counts how often each character occurs", "implements a simple LRU cache",
]
LANGUAGES = ["Python", "JavaScript", "Python", "Go", "Rust", "Java", "C", "Python", "TypeScript", "Python"]
SNIPPETS = [
    ("python", "def total_price(items):\n    s = 0\n    for item in items:\n        s = s + item['price'] * "
     "item['qty']\n    return s\n"),
    ("python", "def longest(words):\n    best = ''\n    for w in words:\n        if len(w) > len(best):\n"
     "            best = w\n    return best\n"),
    ("python", "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n"
     "    return x\n"),
    ("python", "def evens(nums):\n    out = []\n    for n in nums:\n        if n % 2 == 0:\n            out.append(n)\n"
     "    return out\n"),
    ("javascript", "function sum(arr) {\n  let s = 0;\n  for (let i = 0; i < arr.length; i++) {\n    s += arr[i];\n"
     "  }\n  return s;\n}\n"),
    ("javascript", "function maxOf(a, b) {\n  if (a > b) {\n    return a;\n  }\n  return b;\n}\n"),
    ("javascript", "function greet(name) {\n  if (!name) {\n    return 'Hello, stranger';\n  }\n"
     "  return 'Hello, ' + name;\n}\n"),
    ("python", "def word_lengths(text):\n    result = {}\n    for word in text.split():\n"
     "        result[word] = len(word)\n    return result\n"),
    ("python", "class Counter:\n    def __init__(self):\n        self.n = 0\n\n    def inc(self):\n"
     "        self.n += 1\n        return self.n\n"),
    ("javascript", "function isEmpty(obj) {\n  return Object.keys(obj).length === 0;\n}\n"),
]
CODE_TEMPLATES = [
    "Write a {lang} function that {task}.",
    "Write a short {lang} function that {task}. Add a docstring or comment.",
    "Show me how to write a function in {lang} that {task}, with an example call.",
    "Implement a function that {task} in {lang} and explain how it works.",
]
SNIPPET_TEMPLATES = [
    "Add type hints and a docstring to this function. Return only the code.\n\n```{lang}\n{code}```",
    "Explain what this code does, line by line.\n\n```{lang}\n{code}```",
    "Rewrite this code to be shorter and more idiomatic.\n\n```{lang}\n{code}```",
    "Write unit tests for this function.\n\n```{lang}\n{code}```",
    "Translate this code to {other}.\n\n```{lang}\n{code}```",
    "Find possible bugs in this code and fix them.\n\n```{lang}\n{code}```",
]
TEXTS = [
    "The library will close for two weeks in August while the old heating system is replaced. During that "
    "time, books can be returned at the town hall. The online catalogue stays open, and the children's "
    "reading club will meet in the park on Saturday mornings.",
    "Our company had a strong third quarter. Sales grew by nine percent, mostly because of the new coffee "
    "machines, and we opened two shops in the north. Costs rose too, because of higher rents and the price of "
    "milk. Next quarter we plan to hire ten people and update the website.",
    "Scientists found that bees can learn to count up to four. In the experiment, bees were rewarded with "
    "sugar water when they flew past the right number of yellow marks. After some training, most bees chose "
    "the correct place even when the marks were moved.",
    "The football club announced that its stadium will get a new roof before the next season. Fans will pay "
    "the same price for tickets, but parking near the stadium will cost more. The club hopes the roof will "
    "bring more concerts and events to the city.",
    "Residents of the old harbour district asked the city to plant more trees. They say the streets are too "
    "hot in summer and that there is nowhere for children to play. The mayor said the city will plant two "
    "hundred trees next spring and build a small playground.",
    "Project update: the mobile team finished the new search screen, but the tests on tablets still fail. "
    "Maria will look at the tablet bug this week. Tom needs access to the analytics server. The launch is "
    "still planned for the end of the month if the bug is fixed by Friday.",
    "The school will start a cooking class for teenagers this autumn. Students will learn to plan meals, shop "
    "on a budget and cook simple dishes. The class meets every Wednesday afternoon, and parents are invited "
    "to a dinner cooked by the students at the end of the term.",
    "A new train line between the two largest cities will open in June. The trip will take ninety minutes "
    "instead of three hours. Tickets go on sale in May, and students and older travellers get a discount of "
    "thirty percent.",
    "Weekly notes: the server migration is done and no data was lost. Kim will write the user guide for the "
    "new dashboard. The team lunch moves to Thursday. Please send your holiday plans to Sara before the end "
    "of the month so she can plan the support rota.",
    "The museum has opened an exhibition about the history of bicycles. Visitors can see more than fifty "
    "bicycles, from wooden models to modern racing bikes, and try an old bicycle on a safe track. The "
    "exhibition is free for children under twelve.",
    "Farmers in the valley expect a smaller apple harvest this year because of a cold spring and a dry "
    "summer. Prices in the shops may rise. Some farmers are testing new watering systems that use less water "
    "and work with solar power.",
    "The city's recycling rules change next month. Plastic bottles and cans go in the yellow bin, paper in "
    "the blue bin, and food waste in the brown bin. Glass must be taken to the collection points near the "
    "supermarkets. Bins will be emptied every two weeks.",
]
TEXT_TEMPLATES = [
    "Summarise this text in two sentences.\n\n{text}",
    "Give this text a short title and a one-sentence summary.\n\n{text}",
    "Rewrite this text in simple English for a child.\n\n{text}",
    "Rewrite this text as a formal announcement.\n\n{text}",
    "List the key facts in this text as bullet points.\n\n{text}",
    "Write three questions a reader could answer after reading this text.\n\n{text}",
    "Translate this text into French.\n\n{text}",
    "Make this text more concise.\n\n{text}",
]
TYPO_TEMPLATES = [
    "Correct the spelling and grammar of this text. Return only the corrected text.\n\n{text}",
    "Proofread the following paragraph and fix every mistake:\n\n{text}",
]
CONCEPTS = [
    "recursion", "a linked list", "an API", "version control with git", "a database index", "machine learning",
    "photosynthesis", "inflation", "the water cycle", "compound interest", "a neural network", "encryption",
    "how vaccines work", "black holes", "the stock market", "supply and demand", "a compiler", "cloud computing",
    "climate change", "the immune system", "object-oriented programming", "how the internet works",
    "a binary search tree", "the theory of evolution", "renewable energy", "a mortgage", "gravity",
    "how a car engine works", "blockchain", "the French Revolution",
]
AUDIENCES = ["a beginner", "a ten-year-old", "a new programmer", "a high school student", "someone with no background"]
ACTIVITIES = [
    "baking bread at home", "planting tomatoes", "learning to play the guitar", "preparing for a job interview",
    "writing a good cover letter", "training for a 5 km run", "saving money each month", "making a budget",
    "learning a new language", "organising a small wedding", "cleaning a laptop keyboard", "making pancakes",
    "starting a vegetable garden", "setting up a home office", "planning a trip to Japan", "studying for exams",
    "painting a room", "taking better photos with a phone", "making a simple website", "reducing stress at work",
    "cooking rice", "changing a bicycle tyre", "writing a short story", "learning to swim as an adult",
    "getting better sleep", "hosting a dinner party", "moving to a new city", "caring for a cat",
]
CHAT = [
    "What are some good books for learning to cook?", "Why is the sky blue?", "What is the difference between "
    "a virus and a bacterium?", "Can you suggest a name for a small bakery?", "How do I stay motivated when "
    "studying alone?", "What should I pack for a weekend camping trip?", "Write a short poem about autumn.",
    "Tell me a fun fact about octopuses.", "What is a healthy breakfast?", "How can I be more productive in "
    "the morning?", "What are the benefits of walking every day?", "Write a haiku about the sea.",
    "What are good questions to ask at the end of a job interview?", "How do airplanes stay in the air?",
    "What is the best way to learn vocabulary?", "Give me ideas for a birthday party for a seven-year-old.",
    "How do I make a good cup of tea?", "What are the planets of the solar system?", "Why do cats purr?",
    "Write a short story about a robot who learns to paint.", "What is the capital of Australia and why?",
    "How can I reduce plastic waste at home?", "What makes a good team leader?", "Describe a perfect "
    "summer day.", "What are the pros and cons of working from home?", "How do I apologise to a friend?",
    "Write a limerick about a cat.", "What are some tips for public speaking?", "How does a rainbow form?",
    "What are five fun things to do on a rainy day?",
]
CHAT_TEMPLATES = [
    "Explain {concept} to {audience}.", "What is {concept}? Give a short example.",
    "Give step-by-step instructions for {activity}.", "What are five tips for {activity}?",
    "What mistakes do people often make when {activity}?", "Write a short checklist for {activity}.",
    "Why does {concept} matter? Answer in a short paragraph.", "What are common misconceptions about {concept}?",
    "Give me a short history of {concept}.", "I want to start {activity}. Where should I begin?",
    "How long does it take to get good at {activity}, and how should I practise?",
]


DOC_SUBJECTS = [
    "a new bus line in a small town", "a school science fair", "a bakery that opens a second shop",
    "a hospital that hires more nurses", "a music festival moving to a new park", "a company switching to a "
    "four-day week", "a river clean-up by volunteers", "a library that lends tools", "a football team's new "
    "coach", "a city that bans cars from its centre on Sundays", "a startup building delivery robots",
    "a museum exhibition about ancient Egypt", "a heat wave and water restrictions", "a new recycling plant",
    "a university course on artificial intelligence", "a farmers' market that moves indoors for winter",
    "a charity run raising money for a children's hospital", "a software update that broke a banking app",
    "a theatre group performing in schools", "rising rents for students", "a new bike-sharing scheme",
    "a zoo welcoming two baby elephants", "a power cut in a large office building", "a village getting fast "
    "internet", "a team migrating its servers to the cloud", "a restaurant that only serves local food",
    "a local election with record turnout", "a supermarket testing checkout-free shopping",
    "a swimming pool closing for repairs", "a company launching a budget smartphone", "a storm that closed the "
    "airport", "a primary school starting a chess club", "a town festival celebrating its 500th birthday",
    "a bookshop that stays open all night", "a new law on electric scooters", "a hospital opening a new "
    "children's ward", "a factory switching to solar power", "a volunteer group repairing old computers",
    "a cinema showing silent films with live music", "a bakery donating bread to a shelter", "a train strike "
    "next week", "a website outage at an online shop", "a city opening a public rooftop garden",
    "a company's annual staff survey", "a marathon changing its route", "a school replacing textbooks with "
    "tablets", "a new vaccination campaign for older people", "a game studio releasing its first game",
    "a mountain village attracting young families", "a delay in building a new bridge", "an office moving to "
    "a new building", "a team adopting a new project management tool", "a food festival with dishes from "
    "twenty countries", "a bank closing branches in small towns", "a scientist winning a national prize",
    "a park getting new lights and benches", "a company offering free language classes to staff",
    "a river flooding after heavy rain", "a youth orchestra touring abroad", "an app that helps people share "
    "leftover food", "a data breach at a small company", "a summer reading challenge for children",
    "a plan to build affordable housing", "a local radio station celebrating 50 years",
]
DOC_TEMPLATES = [
    "Write a short news article (about 120 words) about {subject}.",
    "Write the notes of a team meeting about {subject}: who said what, decisions, and open questions.",
    "Write a short email to a colleague about {subject}.",
    "Write a short blog post about {subject}.",
    "Write a short press release about {subject}.",
    "Write a short report for a manager about {subject}, with a recommendation.",
    "Write a short social media post and a longer newsletter paragraph about {subject}.",
]


def _typos(text: str, rng: random.Random, rate: float = 0.18) -> str:
    words = text.split(" ")
    out = []
    for w in words:
        if len(w) > 3 and rng.random() < rate:
            i = rng.randrange(1, len(w) - 1)
            op = rng.randrange(3)
            w = w[:i] + w[i] + w[i:] if op == 0 else (w[:i] + w[i + 1:] if op == 1 else w[:i] + w[i + 1] + w[i]
                                                                                      + w[i + 2:])
        out.append(w)
    return " ".join(out)


def training_prompts(count: int = 400, seed: int = 0) -> List[Tuple[str, str]]:
    """Up to ``count`` prompts ``(kind, text)`` in a fixed mix (a kind whose templates are used up leaves the
    mix, so fewer may come back): 30% code, 20% editing/summarising a given text,
    35% instructions and open chat, 15% writing a document (an article, notes, an email) that
    :func:`followup_prompts` can hand back for editing."""
    rng = random.Random(seed)
    out: List[Tuple[str, str]] = []
    seen = set()
    kinds = ["code"] * 6 + ["text"] * 4 + ["chat"] * 7 + ["doc"] * 3
    misses = dict.fromkeys(kinds, 0)  # draws of a kind in a row that gave no new prompt
    i = 0
    while len(out) < count and i < 50 * count and kinds:
        kind = kinds[len(out) % len(kinds)]
        i += 1
        if kind == "code":
            if rng.random() < 0.55:
                p = rng.choice(CODE_TEMPLATES).format(lang=rng.choice(LANGUAGES), task=rng.choice(CODE_TASKS))
            else:
                lang, code = rng.choice(SNIPPETS)
                other = rng.choice([x for x in ("Python", "JavaScript", "Go", "Java") if x.lower() != lang])
                p = rng.choice(SNIPPET_TEMPLATES).format(lang=lang, code=code, other=other)
        elif kind == "doc":
            p = rng.choice(DOC_TEMPLATES).format(subject=rng.choice(DOC_SUBJECTS))
        elif kind == "text":
            text = rng.choice(TEXTS)
            if rng.random() < 0.3:
                p = rng.choice(TYPO_TEMPLATES).format(text=_typos(text, rng))
            else:
                p = rng.choice(TEXT_TEMPLATES).format(text=text)
        else:
            r = rng.random()
            if r < 0.35:
                p = rng.choice(CHAT)
            else:
                p = rng.choice(CHAT_TEMPLATES).format(concept=rng.choice(CONCEPTS), audience=rng.choice(AUDIENCES),
                                                      activity=rng.choice(ACTIVITIES))
        if p not in seen:
            seen.add(p)
            out.append((kind, p))
            misses[kind] = 0
        else:
            misses[kind] += 1
            if misses[kind] >= 200:  # this kind is used up: the others fill the rest
                kinds = [k for k in kinds if k != kind]
    return out


def _code_block(text: str) -> Optional[Tuple[str, str]]:
    """``(language, code)`` of the first fenced code block of a reply, or None."""
    start = text.find("```")
    if start < 0:
        return None
    nl = text.find("\n", start)
    end = text.find("```", nl + 1) if nl >= 0 else -1
    if nl < 0 or end < 0:
        return None
    code = text[nl + 1:end]
    lines = code.count("\n")
    return (text[start + 3:nl].strip() or "python", code) if 2 <= lines <= 30 else None


def followup_prompts(replies: Sequence[Tuple[str, str]], count: int, seed: int = 0,
                     with_source: bool = False) -> List[tuple]:
    """Second-round prompts built on the target's own first-round replies ``(kind, reply text)``: its
    documents handed back to summarise, proofread (with typos added), rewrite or turn into action items,
    and the code it wrote handed back to annotate, explain, test, translate or fix. Up to ``count``
    prompts ``(kind, text)``, seeded; tasks on text the target wrote itself, as in the editing and
    summarising requests a drafter must serve. ``with_source``: ``(kind, text, i)``, ``i`` the index in
    ``replies`` of the reply the prompt hands back (a held-out split must keep the two on one side)."""
    rng = random.Random(seed + 7)
    docs = [(r.strip(), i) for i, (k, r) in enumerate(replies) if k == "doc" and len(r.split()) >= 40]
    codes = [(c, i) for i, (k, r) in enumerate(replies) if k == "code" for c in [_code_block(r)] if c is not None]
    out: List[Tuple[str, str]] = []
    seen = set()
    doc_templates = TEXT_TEMPLATES + [
        "List the action items in this text as bullet points.\n\n{text}",
        "Rewrite this text as a short formal email to the team.\n\n{text}",
        "Summarise this text in three sentences.\n\n{text}",
    ]
    i = 0
    while len(out) < count and i < 20 * count and (docs or codes):
        i += 1
        if codes and (not docs or rng.random() < 0.45):
            (lang, code), src = rng.choice(codes)
            other = rng.choice([x for x in ("Python", "JavaScript", "Go", "Java", "TypeScript") if x.lower() != lang])
            p, kind = rng.choice(SNIPPET_TEMPLATES).format(lang=lang, code=code, other=other), "code"
        else:
            text, src = rng.choice(docs)
            if rng.random() < 0.3:
                p = rng.choice(TYPO_TEMPLATES).format(text=_typos(text, rng))
            else:
                p = rng.choice(doc_templates).format(text=text)
            kind = "text"
        if p not in seen:
            seen.add(p)
            out.append((kind, p, src) if with_source else (kind, p))
    return out
