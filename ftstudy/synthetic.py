"""The embedded default's instruction data, generated offline from a seed.

Three source-shaped sets play the roles of the hub datasets and are written in their exact raw schemas,
so the same converters in :mod:`ftstudy.sources` handle both:

- ``alpaca``: ``{instruction, input, output, text}``, single turn, input optional;
- ``tulu``: ``{dataset, id, messages}``, a mixture of task kinds tagged like tulu-v2's subsets;
- ``ultrachat``: ``{prompt, prompt_id, messages}``, multi-turn conversations whose follow-ups refer
  back to earlier turns, so the history matters.

Every task family computes its reference from the sampled inputs, so references are exactly right and
BLEU/ROUGE measure whether a model learned the task, not whether it memorised text. Phrasings vary per
family; numbers, words and sentences are sampled, so tens of thousands of distinct rows are possible.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

WORDS = (
    "apple river garden window silver market planet forest candle bridge pencil orange marble rocket "
    "thunder basket castle dragon engine feather guitar harbor island jacket kettle lantern meadow "
    "needle ocean pepper quartz rabbit saddle tunnel umbrella valley walnut yellow zebra anchor beacon "
    "cactus desert ember falcon glacier hammer igloo jungle kitten ladder magnet nectar orchard pirate "
    "quiver ribbon summer tiger violin wizard blanket cookie doctor eagle finger ginger honey insect "
    "jelly koala lemon monkey noodle oyster puzzle rocket salmon tomato velvet winter"
).split()
WORDS = tuple(dict.fromkeys(WORDS))

ADJECTIVES = "quick lazy bright quiet happy small large brave clever gentle noisy tiny ancient shiny calm".split()
NOUNS = "cat dog teacher farmer robot child bird student painter sailor baker pilot".split()
VERBS = "watched followed painted visited found carried cleaned chased helped noticed".split()
OBJECTS = "the old house|a red ball|the new car|a small boat|the tall tree|a wooden chair|the green door".split("|")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Chile": "Santiago", "Cuba": "Havana",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Australia": "Canberra", "Brazil": "Brasilia", "India": "New Delhi", "China": "Beijing",
    "Russia": "Moscow", "Turkey": "Ankara", "Morocco": "Rabat", "Ghana": "Accra", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Colombia": "Bogota",
    "Nigeria": "Abuja", "Iceland": "Reykjavik", "Nepal": "Kathmandu",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "open": "closed", "full": "empty", "high": "low", "rich": "poor", "young": "old",
    "hard": "soft", "loud": "quiet", "clean": "dirty", "wet": "dry", "thick": "thin", "near": "far",
    "cheap": "expensive", "deep": "shallow", "heavy": "light", "long": "short", "wide": "narrow",
    "true": "false", "first": "last", "inside": "outside", "above": "below", "win": "lose",
}
PLURALS = {
    "child": "children", "mouse": "mice", "goose": "geese", "man": "men", "woman": "women",
    "tooth": "teeth", "foot": "feet", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "city": "cities", "baby": "babies", "box": "boxes", "bus": "buses",
    "glass": "glasses", "potato": "potatoes", "hero": "heroes", "sheep": "sheep", "fish": "fish",
    "cactus": "cacti", "ox": "oxen", "party": "parties", "wife": "wives", "story": "stories",
}
POSITIVE = "wonderful delightful excellent fantastic lovely brilliant superb pleasant amazing great".split()
NEGATIVE = "terrible awful boring disappointing dreadful horrible poor annoying bland mediocre".split()
REVIEW_THINGS = "movie meal hotel book concert phone game lecture trip service".split()
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Task:
    """One generated task: ``instruction`` may be paired with an ``input`` (alpaca style)."""

    family: str
    instruction: str
    input: str
    response: str

    def as_message(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def _numbers(rng: random.Random, n_min=3, n_max=7, lo=1, hi=99) -> list[int]:
    return rng.sample(range(lo, hi + 1), rng.randint(n_min, n_max))


def _fmt(xs) -> str:
    return ", ".join(str(x) for x in xs)


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(OBJECTS)} in the {rng.choice(['morning', 'evening', 'afternoon', 'night'])}.")


def _pick(rng, phrasings, **kw) -> str:
    return rng.choice(phrasings).format(**kw)


def t_add(rng):
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    q = _pick(rng, ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                    "Calculate {a} + {b}.", "What do you get when you add {a} to {b}?"], a=a, b=b)
    return Task("arithmetic_add", q, "", f"{a} + {b} = {a + b}")


def t_subtract(rng):
    a, b = sorted((rng.randint(2, 999), rng.randint(2, 999)), reverse=True)
    q = _pick(rng, ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
                    "What is the difference between {a} and {b}?"], a=a, b=b)
    return Task("arithmetic_subtract", q, "", f"{a} - {b} = {a - b}")


def t_multiply(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    q = _pick(rng, ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute the product of {a} and {b}.",
                    "Calculate {a} x {b}."], a=a, b=b)
    return Task("arithmetic_multiply", q, "", f"{a} x {b} = {a * b}")


def t_sort(rng):
    xs = _numbers(rng)
    desc = rng.random() < 0.4
    order = "descending" if desc else "ascending"
    q = _pick(rng, ["Sort the following numbers in {o} order.", "Arrange these numbers in {o} order.",
                    "Put the numbers below in {o} order.", "Order this list of numbers from "
                    + ("largest to smallest." if desc else "smallest to largest.")], o=order)
    return Task("sort_numbers", q, _fmt(xs), _fmt(sorted(xs, reverse=desc)))


def t_extreme(rng):
    xs = _numbers(rng)
    largest = rng.random() < 0.5
    word = "largest" if largest else "smallest"
    q = _pick(rng, ["Find the {w} number in the list.", "Which number in this list is the {w}?",
                    "Identify the {w} value among these numbers.", "Return the {w} number from the array."],
              w=word)
    return Task("find_extreme", q, _fmt(xs), f"The {word} number is {max(xs) if largest else min(xs)}.")


def t_reverse(rng):
    w = rng.choice(WORDS)
    q = _pick(rng, ["Reverse the letters of the word \"{w}\".", "Write the word \"{w}\" backwards.",
                    "Spell \"{w}\" in reverse order.", "What is \"{w}\" reversed?"], w=w)
    return Task("reverse_word", q, "", w[::-1])


def t_uppercase(rng):
    s = _sentence(rng)
    q = rng.choice(["Convert the following sentence to uppercase.", "Rewrite this text in capital letters.",
                    "Change every letter in the sentence below to uppercase."])
    return Task("uppercase", q, s, s.upper())


def t_count_words(rng):
    s = _sentence(rng)
    q = rng.choice(["How many words are in the following sentence?", "Count the words in this sentence.",
                    "Tell me the number of words in the text below."])
    return Task("count_words", q, s, f"The sentence has {len(s.split())} words.")


def t_count_letter(rng):
    w = rng.choice(WORDS)
    letter = rng.choice(sorted(set(w)) if rng.random() < 0.8 else "aeiou")
    n = w.count(letter)
    q = _pick(rng, ["How many times does the letter \"{c}\" appear in \"{w}\"?",
                    "Count the occurrences of \"{c}\" in the word \"{w}\".",
                    "In the word \"{w}\", how often does \"{c}\" occur?"], c=letter, w=w)
    return Task("count_letter", q, "", f"The letter \"{letter}\" appears {n} time{'s' if n != 1 else ''} in \"{w}\".")


def t_capital(rng):
    country = rng.choice(sorted(CAPITALS))
    q = _pick(rng, ["What is the capital of {c}?", "Name the capital city of {c}.",
                    "Which city is the capital of {c}?", "Tell me the capital of {c}."], c=country)
    return Task("capital_city", q, "", f"The capital of {country} is {CAPITALS[country]}.")


def t_antonym(rng):
    w = rng.choice(sorted(ANTONYMS))
    q = _pick(rng, ["What is the opposite of \"{w}\"?", "Give an antonym for the word \"{w}\".",
                    "Name a word that means the opposite of \"{w}\"."], w=w)
    return Task("antonym", q, "", f"The opposite of \"{w}\" is \"{ANTONYMS[w]}\".")


def t_plural(rng):
    w = rng.choice(sorted(PLURALS))
    q = _pick(rng, ["What is the plural of \"{w}\"?", "Write the plural form of the word \"{w}\".",
                    "How do you say more than one \"{w}\"?"], w=w)
    return Task("plural", q, "", f"The plural of \"{w}\" is \"{PLURALS[w]}\".")


def t_convert(rng):
    kind = rng.choice(["km", "hours", "kg", "minutes"])
    n = rng.randint(2, 250)
    if kind == "km":
        q = _pick(rng, ["How many meters are in {n} kilometers?", "Convert {n} km to meters."], n=n)
        return Task("unit_conversion", q, "", f"{n} kilometers is {n * 1000} meters.")
    if kind == "hours":
        q = _pick(rng, ["How many minutes are in {n} hours?", "Convert {n} hours to minutes."], n=n)
        return Task("unit_conversion", q, "", f"{n} hours is {n * 60} minutes.")
    if kind == "kg":
        q = _pick(rng, ["How many grams are in {n} kilograms?", "Convert {n} kg to grams."], n=n)
        return Task("unit_conversion", q, "", f"{n} kilograms is {n * 1000} grams.")
    q = _pick(rng, ["How many seconds are in {n} minutes?", "Convert {n} minutes to seconds."], n=n)
    return Task("unit_conversion", q, "", f"{n} minutes is {n * 60} seconds.")


def t_alphabetize(rng):
    ws = rng.sample(WORDS, rng.randint(3, 6))
    q = rng.choice(["Sort these words alphabetically.", "Put the following words in alphabetical order.",
                    "Arrange the words below from A to Z."])
    return Task("alphabetize", q, ", ".join(ws), ", ".join(sorted(ws)))


def t_parity(rng):
    n = rng.randint(1, 9999)
    q = _pick(rng, ["Is {n} even or odd?", "Tell me whether {n} is an even or an odd number.",
                    "Classify the number {n} as even or odd."], n=n)
    return Task("parity", q, "", f"{n} is {'even' if n % 2 == 0 else 'odd'}.")


def t_sentiment(rng):
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    thing = rng.choice(REVIEW_THINGS)
    review = rng.choice([f"The {thing} was {adj}.", f"What a {adj} {thing}!",
                         f"I found the {thing} {adj} from start to finish.",
                         f"Honestly, the {thing} was {adj} and I would say so again."])
    q = rng.choice(["Classify the sentiment of this review as positive or negative.",
                    "Is the following review positive or negative?",
                    "Decide whether the sentiment of the text below is positive or negative."])
    return Task("sentiment", q, review, "Positive" if positive else "Negative")


def t_spell(rng):
    w = rng.choice(WORDS)
    q = _pick(rng, ["Spell the word \"{w}\" letter by letter.", "Split \"{w}\" into its letters, separated by dashes."],
              w=w)
    return Task("spell_word", q, "", "-".join(w))


def t_weekday(rng):
    start, n = rng.randrange(7), rng.randint(1, 30)
    q = _pick(rng, ["If today is {d}, what day will it be in {n} days?",
                    "Today is {d}. Which day of the week is it {n} days from now?"], d=DAYS[start], n=n)
    return Task("weekday", q, "", f"It will be {DAYS[(start + n) % 7]}.")


def t_multiples(rng):
    k, n = rng.randint(2, 12), rng.randint(3, 8)
    q = _pick(rng, ["List the first {n} multiples of {k}.", "Write out the first {n} multiples of the number {k}."],
              n=n, k=k)
    return Task("multiples", q, "", _fmt(k * i for i in range(1, n + 1)))


FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    f.__name__[2:]: f
    for f in (t_add, t_subtract, t_multiply, t_sort, t_extreme, t_reverse, t_uppercase, t_count_words,
              t_count_letter, t_capital, t_antonym, t_plural, t_convert, t_alphabetize, t_parity,
              t_sentiment, t_spell, t_weekday, t_multiples)
}

# tulu-v2 tags each row with the subset it came from; the mixture here tags by task kind the same way.
TULU_SUBSET = {
    "add": "cot", "subtract": "cot", "multiply": "cot", "convert": "cot", "weekday": "cot",
    "sort": "code_alpaca", "extreme": "code_alpaca", "alphabetize": "code_alpaca", "multiples": "code_alpaca",
    "reverse": "flan_v2", "uppercase": "flan_v2", "count_words": "flan_v2", "count_letter": "flan_v2",
    "sentiment": "flan_v2", "parity": "flan_v2", "spell": "flan_v2",
    "capital": "oasst1", "antonym": "oasst1", "plural": "oasst1",
}


def _task(rng: random.Random) -> Task:
    return FAMILIES[rng.choice(sorted(FAMILIES))](rng)


def alpaca_row(rng: random.Random) -> tuple[dict, str]:
    t = _task(rng)
    # alpaca's own `text` column: the Stanford prompt with the answer, kept for schema fidelity.
    head = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n" if t.input else
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n")
    text = head + f"### Instruction:\n{t.instruction}\n\n" + (f"### Input:\n{t.input}\n\n" if t.input else "")
    text += f"### Response:\n{t.response}"
    return {"instruction": t.instruction, "input": t.input, "output": t.response, "text": text}, t.family


def tulu_row(rng: random.Random, index: int, split: str) -> tuple[dict, str]:
    name = rng.choice(sorted(FAMILIES))
    t = FAMILIES[name](rng)
    subset = TULU_SUBSET[name]
    return {
        "dataset": subset,
        "id": f"{subset}_{split}_{index}",
        "messages": [{"role": "user", "content": t.as_message()}, {"role": "assistant", "content": t.response}],
    }, t.family


def _conversation(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    """A multi-turn exchange whose follow-ups can only be answered from earlier turns, and its kind."""
    kind = rng.choice(["numbers", "word", "country", "sentence"])
    if kind == "numbers":
        xs = _numbers(rng, 3, 6)
        turns = [(f"Here is a list of numbers: {_fmt(xs)}. Which one is the largest?",
                  f"The largest number is {max(xs)}.")]
        follow = [("Now sort them in ascending order.", _fmt(sorted(xs))),
                  ("And which one is the smallest?", f"The smallest number is {min(xs)}."),
                  ("What is their sum?", f"The sum is {sum(xs)}."),
                  ("How many numbers are in the list?", f"There are {len(xs)} numbers.")]
    elif kind == "word":
        w, other = rng.sample(WORDS, 2)
        turns = [(f"I have two words, \"{w}\" and \"{other}\". How many letters does the first one have?",
                  f"\"{w}\" has {len(w)} letters.")]
        follow = [("Spell it backwards.", w[::-1]), ("Spell it letter by letter.", "-".join(w)),
                  ("Write it in uppercase.", w.upper()), ("What is its first letter?", f"Its first letter is \"{w[0]}\".")]
    elif kind == "country":
        c = rng.choice(sorted(CAPITALS))
        days = rng.randint(2, 30)
        turns = [(f"I am planning a {days}-day trip to {c}. What is its capital?",
                  f"The capital of {c} is {CAPITALS[c]}.")]
        follow = [("How many letters are in the name of that capital?",
                   f"\"{CAPITALS[c]}\" has {len(CAPITALS[c].replace(' ', ''))} letters."),
                  ("Spell the country's name backwards.", c[::-1]),
                  ("Write the capital in uppercase.", CAPITALS[c].upper()),
                  ("How many hours long is my trip?", f"Your trip is {days * 24} hours long.")]
    else:
        s = _sentence(rng)
        turns = [(f"Consider this sentence: \"{s}\" How many words does it have?", f"The sentence has {len(s.split())} words.")]
        follow = [("Rewrite it in uppercase.", s.upper()), ("What is its last word?", f"Its last word is \"{s.split()[-1].rstrip('.')}\"."),
                  ("What is its first word?", f"Its first word is \"{s.split()[0]}\".")]
    turns += rng.sample(follow, rng.randint(1, min(3, len(follow))))
    return turns, f"conversation_{kind}"


def ultrachat_row(rng: random.Random) -> tuple[dict, str]:
    turns, family = _conversation(rng)
    messages = []
    for user, assistant in turns:
        messages += [{"content": user, "role": "user"}, {"content": assistant, "role": "assistant"}]
    prompt = turns[0][0]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}, family


# The hub's split names: alpaca and tulu-v2 publish only `train`; ultrachat_200k has train_sft/test_sft.
RAW_SPLITS = {"alpaca": ("train",), "tulu": ("train",), "ultrachat": ("train_sft", "test_sft")}


def generate_with_families(source: str, split: str, n: int, seed: int) -> list[tuple[dict, str]]:
    """``n`` raw rows of ``source`` in its hub schema, each with the task family that computed its answer
    (kept apart from the row, whose schema is the hub's); deterministic in (source, split, seed)."""
    # A string seed hashes stably across runs (Python's hash() of str is salted per process; this is not).
    rng = random.Random(f"{seed}/{source}/{split}")
    if source == "alpaca":
        return [alpaca_row(rng) for _ in range(n)]
    if source == "tulu":
        return [tulu_row(rng, i, split) for i in range(n)]
    if source == "ultrachat":
        return [ultrachat_row(rng) for _ in range(n)]
    raise ValueError(f"unknown source {source!r}")


def generate(source: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` raw rows of ``source`` in its hub schema; deterministic in (source, split, seed)."""
    return [row for row, _ in generate_with_families(source, split, n, seed)]
