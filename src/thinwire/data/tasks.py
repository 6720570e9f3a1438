"""A built-in instruction workload, generated procedurally and deterministically.

No dataset hub is reachable from where thinwire runs, so it brings its own tasks:
families of short, exact-match-checkable instructions (string edits, arithmetic,
list operations, formatting and extraction, table look-ups, unit conversions).
Every family draws its inputs from a ``random.Random`` seeded from the caller's
seed mixed with a stable hash of the family name, so the same ``(family, n, seed)``
gives the same examples in every process, and a longer run extends a shorter one.

Outputs are short (a few words, never more than 80 characters) with a single
correct answer, so a 135M model can be scored by exact match before and after tuning.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from thinwire.errors import UsageError

__all__ = [
    "TaskFamily",
    "FAMILIES",
    "categories",
    "families_in",
    "generate",
    "generate_suite",
    "example",
    "describe",
    "derived_seed",
]


@dataclass(frozen=True)
class TaskFamily:
    name: str  # kebab-case, e.g. "reverse-word"
    category: str  # e.g. "string"
    instruction: str  # the same for every example of the family
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input, output)


# --------------------------------------------------------------------------------------
# Built-in vocabulary and tables
# --------------------------------------------------------------------------------------

# Common lowercase words: 3-8 letters, each with a vowel (aeiou), none starting with "qu".
WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "window", "silver", "pencil", "mountain", "bread",
    "candle", "forest", "rabbit", "yellow", "orange", "planet", "bottle", "copper",
    "dragon", "jacket", "kitten", "lemon", "marble", "needle", "ocean", "pepper",
    "rocket", "saddle", "tiger", "velvet", "wagon", "anchor", "basket", "cactus",
    "donkey", "engine", "falcon", "guitar", "hammer", "island", "jungle", "ladder",
    "magnet", "nickel", "oyster", "parrot", "ribbon", "salmon", "tunnel", "violin",
    "walnut", "zipper", "banana", "cherry", "cotton", "desert", "feather", "ginger",
    "harbor", "lantern", "meadow", "pillow", "spider", "thunder", "blanket", "castle",
    "circle", "cloud", "house", "table", "chair", "green", "stone", "water", "light",
    "music", "paper", "smile", "storm", "train", "horse", "money", "sugar", "honey",
    "lake", "moon", "star", "fish", "bird", "road", "door", "book", "tree", "milk",
    "salt", "rain", "snow", "wind", "fire", "gold", "iron", "rice", "corn", "bean",
    "wolf", "bear", "frog", "duck", "goat", "lion", "mouse", "sheep", "camel", "zebra",
    "shell", "brick", "glass", "plant", "grape", "peach", "melon", "onion", "carrot",
    "potato", "tomato", "turnip", "button", "carpet", "mirror", "helmet", "pocket",
    "bucket", "rubber", "timber", "winter", "summer", "autumn", "spring", "market",
    "school", "doctor", "farmer", "sailor", "singer", "painter", "teacher", "pilot",
    "brave", "quiet", "happy", "gentle", "bright", "simple", "narrow", "little",
    "purple", "golden", "wooden", "silent", "rapid", "humble", "clever", "sturdy",
)

NAMES: tuple[str, ...] = (
    "Maya", "Omar", "Lena", "Ravi", "Sofia", "Jonas", "Amara", "Diego", "Hana", "Ivan",
    "Chloe", "Kofi", "Nora", "Tariq", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jamal",
    "Keiko", "Liam", "Mira", "Nikolai", "Olga", "Pablo", "Rosa", "Samir", "Tessa", "Yusuf",
)

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Belgium": "Brussels", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Iran": "Tehran",
    "Iraq": "Baghdad", "Turkey": "Ankara", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Brazil": "Brasilia", "Australia": "Canberra",
    "New Zealand": "Wellington", "Philippines": "Manila", "South Korea": "Seoul",
    "Pakistan": "Islamabad",
}

ELEMENTS: dict[str, str] = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "beryllium": "Be", "boron": "B",
    "carbon": "C", "nitrogen": "N", "oxygen": "O", "fluorine": "F", "neon": "Ne",
    "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K",
    "calcium": "Ca", "titanium": "Ti", "chromium": "Cr", "manganese": "Mn", "iron": "Fe",
    "cobalt": "Co", "nickel": "Ni", "copper": "Cu", "zinc": "Zn", "arsenic": "As",
    "bromine": "Br", "krypton": "Kr", "silver": "Ag", "tin": "Sn", "iodine": "I",
    "xenon": "Xe", "platinum": "Pt", "gold": "Au", "mercury": "Hg", "lead": "Pb",
    "uranium": "U",
}

# Antonyms with one canonical answer. Pairs in OPPOSITE_PAIRS are asked both ways; in
# OPPOSITE_ONE_WAY only left-to-right, because the reverse has several common answers
# (e.g. the opposite of "old" could be "young" or "new").
OPPOSITE_PAIRS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("up", "down"), ("open", "closed"), ("happy", "sad"),
    ("early", "late"), ("full", "empty"), ("wet", "dry"), ("strong", "weak"),
    ("rich", "poor"), ("clean", "dirty"), ("inside", "outside"), ("buy", "sell"),
    ("push", "pull"), ("true", "false"), ("above", "below"), ("before", "after"),
    ("day", "night"), ("north", "south"), ("east", "west"), ("friend", "enemy"),
    ("love", "hate"), ("cheap", "expensive"), ("safe", "dangerous"), ("remember", "forget"),
    ("always", "never"), ("maximum", "minimum"), ("positive", "negative"),
    ("increase", "decrease"), ("import", "export"), ("winner", "loser"),
)
OPPOSITE_ONE_WAY: tuple[tuple[str, str], ...] = (
    ("young", "old"), ("fast", "slow"), ("big", "small"), ("long", "short"),
    ("dark", "light"), ("thick", "thin"), ("loud", "quiet"), ("high", "low"),
    ("difficult", "easy"), ("wide", "narrow"), ("sharp", "blunt"), ("near", "far"),
    ("arrive", "leave"), ("accept", "refuse"), ("give", "take"), ("begin", "end"),
    ("left", "right"), ("first", "last"), ("win", "lose"), ("question", "answer"),
)

PLURALS: dict[str, str] = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "car": "cars",
    "house": "houses", "apple": "apples", "river": "rivers", "chair": "chairs",
    "box": "boxes", "fox": "foxes", "bus": "buses", "dish": "dishes", "church": "churches",
    "glass": "glasses", "watch": "watches", "brush": "brushes", "city": "cities",
    "baby": "babies", "party": "parties", "story": "stories", "lady": "ladies",
    "berry": "berries", "day": "days", "key": "keys", "boy": "boys", "toy": "toys",
    "leaf": "leaves", "knife": "knives", "wife": "wives", "wolf": "wolves",
    "shelf": "shelves", "half": "halves", "potato": "potatoes", "tomato": "tomatoes",
    "hero": "heroes", "child": "children", "man": "men", "woman": "women",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "mouse": "mice", "person": "people",
    "ox": "oxen", "sheep": "sheep", "fish": "fish", "deer": "deer", "crisis": "crises",
    "photo": "photos", "piano": "pianos",
}

MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
)

WEEKDAYS: tuple[str, ...] = (
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
)

EMAIL_DOMAINS: tuple[str, ...] = (
    "example.com", "mail.org", "post.net", "inbox.io", "letters.co", "company.com",
)

VOWELS = "aeiou"
_CONSONANTS = "bdfgklmnprstvz"


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable nonce word such as "kemasu" or "dorvin" (4-9 letters)."""
    parts = []
    for _ in range(rng.randint(2, 3)):
        parts.append(rng.choice(_CONSONANTS) + rng.choice(VOWELS))
    if rng.random() < 0.5:
        parts.append(rng.choice(_CONSONANTS))
    return "".join(parts)


def _word(rng: random.Random) -> str:
    """A real word 20% of the time, otherwise a nonce word, so inputs rarely repeat."""
    return rng.choice(WORDS) if rng.random() < 0.2 else _pseudo_word(rng)


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(WORDS, k)


def _pig_latin(word: str) -> str:
    if word[0] in VOWELS:
        return word + "way"
    i = 0
    while i < len(word) and word[i] not in VOWELS:
        i += 1
    return word[i:] + word[:i] + "ay"


def _num(x: float) -> str:
    """1.0 -> "1", 2.5 -> "2.5" (inputs only; outputs are always integers)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# --------------------------------------------------------------------------------------
# string
# --------------------------------------------------------------------------------------


def _reverse_word(rng):
    w = _word(rng)
    return w, w[::-1]


def _uppercase(rng):
    phrase = " ".join(_words(rng, rng.randint(2, 3)))
    return phrase, phrase.upper()


def _remove_vowels(rng):
    w = _word(rng)
    return w, "".join(c for c in w if c not in VOWELS)


def _swap_case(rng):
    while True:
        w = "".join(c.upper() if rng.random() < 0.5 else c for c in _word(rng))
        if w != w.lower() and w != w.upper():
            return w, w.swapcase()


def _acronym(rng):
    ws = _words(rng, rng.randint(3, 4))
    return " ".join(ws), "".join(w[0] for w in ws).upper()


def _pig_latin_family(rng):
    w = _word(rng)
    return w, _pig_latin(w)


def _repeat_word(rng):
    w, k = _word(rng), rng.randint(2, 4)
    return f"word: {w}, times: {k}", " ".join([w] * k)


def _word_length(rng):
    w = _word(rng)
    return w, str(len(w))


# --------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------


def _add(rng):
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"{a} + {b}", str(a + b)


def _subtract(rng):
    a, b = sorted(rng.sample(range(10, 1000), 2), reverse=True)
    return f"{a} - {b}", str(a - b)


def _multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 199)
    if rng.random() < 0.5:
        a, b = b, a
    return f"{a} * {b}", str(a * b)


def _add_three(rng):
    xs = [rng.randint(1, 99) for _ in range(3)]
    return " + ".join(map(str, xs)), str(sum(xs))


def _parity(rng):
    n = rng.randint(1, 9999)
    return str(n), "even" if n % 2 == 0 else "odd"


def _larger_number(rng):
    a = rng.randint(10, 999)
    # Half the time the two numbers are close (same digits swapped or nearby).
    b = a + rng.choice([-1, 1]) * rng.randint(1, 30) if rng.random() < 0.5 else rng.randint(10, 999)
    while b == a or b < 1:
        b = rng.randint(10, 999)
    return f"{a}, {b}", str(max(a, b))


def _divide(rng):
    q, d = rng.randint(2, 250), rng.randint(2, 12)
    return f"{q * d} / {d}", str(q)


# --------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------


def _num_list(rng, lo, hi, kmin, kmax):
    return rng.sample(range(lo, hi + 1), rng.randint(kmin, kmax))


def _sort_numbers(rng):
    xs = _num_list(rng, 1, 99, 4, 6)
    return ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))


def _max_number(rng):
    xs = _num_list(rng, 1, 999, 4, 7)
    return ", ".join(map(str, xs)), str(max(xs))


def _min_number(rng):
    xs = _num_list(rng, 1, 999, 4, 7)
    return ", ".join(map(str, xs)), str(min(xs))


def _count_items(rng):
    ws = _words(rng, rng.randint(2, 9))
    return ", ".join(ws), str(len(ws))


def _last_item(rng):
    ws = _words(rng, rng.randint(3, 6))
    return ", ".join(ws), ws[-1]


def _deduplicate(rng):
    base = _words(rng, rng.randint(3, 5))
    seq = base + [rng.choice(base) for _ in range(rng.randint(1, 3))]
    rng.shuffle(seq)
    out = list(dict.fromkeys(seq))
    return ", ".join(seq), ", ".join(out)


def _reverse_list(rng):
    ws = _words(rng, rng.randint(3, 5))
    return ", ".join(ws), ", ".join(reversed(ws))


def _sum_list(rng):
    xs = [rng.randint(1, 30) for _ in range(rng.randint(3, 5))]
    return ", ".join(map(str, xs)), str(sum(xs))


# --------------------------------------------------------------------------------------
# format & extraction
# --------------------------------------------------------------------------------------

_YEAR_TEMPLATES = (
    "{name} moved to {city} in {x}.",
    "The {w} festival in {city} was first held in {x}.",
    "In {x}, {name} opened a small {w} shop.",
    "{name} found an old {w} that was made in {x}.",
    "The bridge near {city} was finished in {x} after a long delay.",
    "Records show that {name} visited {city} in {x}.",
)

_NUMBER_TEMPLATES = (
    "{name} counted {x} birds near the {w}.",
    "The library in {city} holds {x} books about the {w}.",
    "There were {x} people waiting outside the {w} shop.",
    "{name} walked {x} steps before reaching the {w}.",
    "The farm near {city} harvested {x} baskets this week.",
    "A crate of {w} weighs {x} grams according to {name}.",
)

_EMAIL_TEMPLATES = (
    "Please send the {w} report to {x} before Friday.",
    "You can reach {name} at {x} for questions.",
    "For tickets in {city}, write to {x} today.",
    "{name} said to contact {x} about the {w}.",
    "Questions about the {w} go to {x}, thanks.",
)


def _fill(rng, templates, x):
    return rng.choice(templates).format(
        name=rng.choice(NAMES), city=rng.choice(list(CAPITALS.values())), w=rng.choice(WORDS), x=x
    )


def _extract_year(rng):
    year = str(rng.randint(1800, 2099))
    return _fill(rng, _YEAR_TEMPLATES, year), year


def _extract_number(rng):
    n = str(rng.randint(2, 9999))
    return _fill(rng, _NUMBER_TEMPLATES, n), n


def _extract_email(rng):
    user = rng.choice(NAMES).lower()
    if rng.random() < 0.5:
        user += "." + rng.choice(WORDS)
    else:
        user += str(rng.randint(1, 99))
    email = f"{user}@{rng.choice(EMAIL_DOMAINS)}"
    return _fill(rng, _EMAIL_TEMPLATES, email), email


_DATE_MIN = datetime.date(1900, 1, 1).toordinal()
_DATE_MAX = datetime.date(2099, 12, 31).toordinal()


def _date_reformat(rng):
    d = datetime.date.fromordinal(rng.randint(_DATE_MIN, _DATE_MAX))
    return d.strftime("%Y-%m-%d"), d.strftime("%d/%m/%Y")


def _title_case(rng):
    ws = _words(rng, rng.randint(3, 5))
    return " ".join(ws), " ".join(w.capitalize() for w in ws)


def _camel_to_snake(rng):
    ws = _words(rng, rng.randint(2, 4))
    camel = ws[0] + "".join(w.capitalize() for w in ws[1:])
    return camel, "_".join(ws)


_JSON_FIELDS: tuple[tuple[str, Callable[[random.Random], object]], ...] = (
    ("name", lambda r: r.choice(NAMES)),
    ("age", lambda r: r.randint(18, 90)),
    ("city", lambda r: r.choice(list(CAPITALS.values()))),
    ("color", lambda r: r.choice(("red", "blue", "green", "black", "white", "purple", "orange"))),
    ("score", lambda r: r.randint(0, 100)),
    ("pet", lambda r: r.choice(("cat", "dog", "parrot", "rabbit", "turtle", "hamster"))),
    ("id", lambda r: r.randint(1000, 9999)),
    ("item", lambda r: r.choice(WORDS)),
)


def _json_lookup(rng):
    fields = rng.sample(_JSON_FIELDS, rng.randint(3, 4))
    obj = {key: gen(rng) for key, gen in fields}
    key = rng.choice(list(obj))
    return f"{json.dumps(obj)}\nkey: {key}", str(obj[key])


# --------------------------------------------------------------------------------------
# lookup (small built-in tables)
# --------------------------------------------------------------------------------------

_OPPOSITES: dict[str, str] = dict(OPPOSITE_ONE_WAY)
for _a, _b in OPPOSITE_PAIRS:
    _OPPOSITES[_a], _OPPOSITES[_b] = _b, _a
assert len(_OPPOSITES) == 2 * len(OPPOSITE_PAIRS) + len(OPPOSITE_ONE_WAY), "duplicate antonym"


def _capital_of(rng):
    country = rng.choice(list(CAPITALS))
    return country, CAPITALS[country]


def _chemical_symbol(rng):
    el = rng.choice(list(ELEMENTS))
    return el, ELEMENTS[el]


def _opposite_word(rng):
    w = rng.choice(list(_OPPOSITES))
    return w, _OPPOSITES[w]


def _plural_form(rng):
    w = rng.choice(list(PLURALS))
    return w, PLURALS[w]


def _month_name(rng):
    m = rng.randint(1, 12)
    return str(m), MONTHS[m - 1]


def _next_weekday(rng):
    i = rng.randrange(7)
    return WEEKDAYS[i], WEEKDAYS[(i + 1) % 7]


def _next_letter(rng):
    i = rng.randrange(25)
    return "abcdefghijklmnopqrstuvwxyz"[i], "abcdefghijklmnopqrstuvwxyz"[i + 1]


# --------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------


def _km_to_m(rng):
    tenths = rng.randint(1, 9999)  # 0.1 km .. 999.9 km
    return f"{_num(tenths / 10)} km", str(tenths * 100)


def _kg_to_g(rng):
    tenths = rng.randint(1, 9999)
    return f"{_num(tenths / 10)} kg", str(tenths * 100)


def _m_to_cm(rng):
    cm = rng.randint(1, 9999)  # 0.01 m .. 99.99 m
    return f"{_num(cm / 100)} m", str(cm)


def _hours_to_minutes(rng):
    h, m = rng.randint(1, 23), rng.randint(0, 59)
    if rng.random() < 0.5:
        text = f"{h} h {m} min"
    else:
        text = f"{h} hour{'s' if h != 1 else ''}"
        if m:
            text += f" and {m} minute{'s' if m != 1 else ''}"
    return text, str(h * 60 + m)


def _celsius_to_fahrenheit(rng):
    c = 5 * rng.randint(-12, 40)  # -60..200 °C; multiples of 5 give integer °F
    return f"{c} °C", str(c * 9 // 5 + 32)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

_NUMBER_ONLY = " Answer with the number only."

_SPECS: tuple[tuple[str, str, str, Callable[[random.Random], tuple[str, str]]], ...] = (
    # string
    ("reverse-word", "string", "Reverse the letters of the word.", _reverse_word),
    ("uppercase", "string", "Rewrite the text in uppercase letters.", _uppercase),
    (
        "remove-vowels",
        "string",
        "Remove every vowel (a, e, i, o, u) from the word.",
        _remove_vowels,
    ),
    (
        "swap-case",
        "string",
        "Swap the case of every letter: uppercase becomes lowercase and lowercase "
        "becomes uppercase.",
        _swap_case,
    ),
    (
        "acronym",
        "string",
        "Write the acronym of the phrase: the first letter of each word, in uppercase.",
        _acronym,
    ),
    (
        "pig-latin",
        "string",
        "Translate the word into Pig Latin: move the consonants before the first vowel "
        "to the end and add \"ay\"; if the word starts with a vowel, just add \"way\".",
        _pig_latin_family,
    ),
    (
        "repeat-word",
        "string",
        "Repeat the word the given number of times, separated by spaces.",
        _repeat_word,
    ),
    ("word-length", "string", "How many letters does the word have?" + _NUMBER_ONLY, _word_length),
    # arithmetic
    ("add", "arithmetic", "Add the two numbers." + _NUMBER_ONLY, _add),
    (
        "subtract",
        "arithmetic",
        "Subtract the second number from the first." + _NUMBER_ONLY,
        _subtract,
    ),
    ("multiply", "arithmetic", "Multiply the two numbers." + _NUMBER_ONLY, _multiply),
    ("add-three", "arithmetic", "Add the three numbers." + _NUMBER_ONLY, _add_three),
    ("parity", "arithmetic", "Is the number even or odd? Answer \"even\" or \"odd\".", _parity),
    (
        "larger-number",
        "arithmetic",
        "Which of the two numbers is larger? Answer with that number.",
        _larger_number,
    ),
    (
        "divide",
        "arithmetic",
        "Divide the first number by the second; the division is exact." + _NUMBER_ONLY,
        _divide,
    ),
    # list
    (
        "sort-numbers",
        "list",
        "Sort the numbers from smallest to largest, separated by commas.",
        _sort_numbers,
    ),
    ("max-number", "list", "What is the largest number in the list?" + _NUMBER_ONLY, _max_number),
    ("min-number", "list", "What is the smallest number in the list?" + _NUMBER_ONLY, _min_number),
    ("count-items", "list", "How many items are in the list?" + _NUMBER_ONLY, _count_items),
    ("last-item", "list", "What is the last item of the list?", _last_item),
    (
        "deduplicate",
        "list",
        "Remove the repeated items from the list, keeping the first occurrence of each, "
        "separated by commas.",
        _deduplicate,
    ),
    (
        "reverse-list",
        "list",
        "Write the items of the list in reverse order, separated by commas.",
        _reverse_list,
    ),
    ("sum-list", "list", "What is the sum of the numbers in the list?" + _NUMBER_ONLY, _sum_list),
    # format & extraction
    (
        "extract-year",
        "format",
        "Which year is mentioned in the sentence? Answer with the year only.",
        _extract_year,
    ),
    (
        "extract-number",
        "format",
        "Which number is mentioned in the sentence?" + _NUMBER_ONLY,
        _extract_number,
    ),
    ("extract-email", "format", "Extract the email address from the sentence.", _extract_email),
    (
        "date-reformat",
        "format",
        "Rewrite the date from YYYY-MM-DD format into DD/MM/YYYY format.",
        _date_reformat,
    ),
    (
        "title-case",
        "format",
        "Rewrite the text in title case: capitalize the first letter of every word.",
        _title_case,
    ),
    (
        "camel-to-snake",
        "format",
        "Convert the camelCase identifier to snake_case.",
        _camel_to_snake,
    ),
    (
        "json-lookup",
        "format",
        "Give the value of the requested key in the JSON object.",
        _json_lookup,
    ),
    # lookup
    ("capital-of", "lookup", "What is the capital city of the country?", _capital_of),
    ("chemical-symbol", "lookup", "What is the chemical symbol of the element?", _chemical_symbol),
    ("opposite-word", "lookup", "Give the opposite of the word.", _opposite_word),
    ("plural-form", "lookup", "Give the plural form of the noun.", _plural_form),
    (
        "month-name",
        "lookup",
        "Which month has this number? Answer with the month's name.",
        _month_name,
    ),
    ("next-weekday", "lookup", "Which day of the week comes after this one?", _next_weekday),
    ("next-letter", "lookup", "Which letter comes next in the alphabet?", _next_letter),
    # units
    (
        "km-to-m",
        "units",
        "Convert the distance from kilometres to metres." + _NUMBER_ONLY,
        _km_to_m,
    ),
    ("kg-to-g", "units", "Convert the mass from kilograms to grams." + _NUMBER_ONLY, _kg_to_g),
    ("m-to-cm", "units", "Convert the length from metres to centimetres." + _NUMBER_ONLY, _m_to_cm),
    (
        "hours-to-minutes",
        "units",
        "Convert the duration into minutes." + _NUMBER_ONLY,
        _hours_to_minutes,
    ),
    (
        "celsius-to-fahrenheit",
        "units",
        "Convert the temperature from degrees Celsius to degrees Fahrenheit." + _NUMBER_ONLY,
        _celsius_to_fahrenheit,
    ),
)

FAMILIES: dict[str, TaskFamily] = {
    name: TaskFamily(name=name, category=category, instruction=instruction, make=make)
    for name, category, instruction, make in _SPECS
}

# Families whose whole input space is a small table (or a small range): their inputs
# necessarily repeat, and train and eval examples necessarily overlap.
SMALL_INPUT_SPACE: frozenset[str] = frozenset(
    {
        "capital-of", "chemical-symbol", "opposite-word", "plural-form", "month-name",
        "next-weekday", "next-letter", "celsius-to-fahrenheit",
    }
)

_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
assert all(_KEBAB.match(n) for n in FAMILIES), "family names must be kebab-case"
assert len(FAMILIES) == len(_SPECS), "duplicate family name"


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def categories() -> list[str]:
    """Sorted unique category names."""
    return sorted({f.category for f in FAMILIES.values()})


def families_in(category: str) -> list[str]:
    """Family names of one category, in registry order."""
    if category not in categories():
        raise UsageError(
            f"unknown task category {category!r}; choose one of: {', '.join(categories())}"
        )
    return [n for n, f in FAMILIES.items() if f.category == category]


def _family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown task family {name!r}; run `thinwire tasks` to list them"
        ) from None


def derived_seed(family: str, seed: int) -> int:
    """A 64-bit seed mixing ``seed`` with a stable (process-independent) hash of ``family``."""
    digest = hashlib.sha256(f"thinwire-tasks\x00{family}\x00{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate(family: str, n: int, seed: int) -> list[dict]:
    """``n`` examples of one family, deterministic in ``(family, n, seed)``.

    Each example is ``{"instruction", "input", "output", "category", "task"}``.
    Examples are drawn one after another from one generator, so
    ``generate(f, n, s)[:m] == generate(f, m, s)`` for ``m <= n``.
    """
    fam = _family(family)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"number of examples must be a non-negative integer, got {n!r}")
    rng = random.Random(derived_seed(fam.name, seed))
    out = []
    for _ in range(n):
        inp, outp = fam.make(rng)
        out.append(
            {
                "instruction": fam.instruction,
                "input": inp,
                "output": outp,
                "category": fam.category,
                "task": fam.name,
            }
        )
    return out


def generate_suite(n_per_family: int, seed: int, families: list[str] | None = None) -> list[dict]:
    """``n_per_family`` examples of each family (all of them by default), family by family.

    Each family's block equals ``generate(family, n_per_family, seed)``; shuffle the
    result yourself if you need the families interleaved.
    """
    names = list(FAMILIES) if families is None else list(families)
    for name in names:
        _family(name)  # fail before generating anything
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"task family {dup!r} is listed more than once")
    out: list[dict] = []
    for name in names:
        out.extend(generate(name, n_per_family, seed))
    return out


def example(family: str, seed: int = 0) -> dict:
    """One example of a family (the first of ``generate(family, 1, seed)``)."""
    return generate(family, 1, seed)[0]


def describe(seed: int = 0) -> list[dict]:
    """One row per family, for listing: name, category, instruction, example input/output."""
    rows = []
    for name, fam in FAMILIES.items():
        ex = example(name, seed)
        rows.append(
            {
                "name": name,
                "category": fam.category,
                "instruction": fam.instruction,
                "input": ex["input"],
                "output": ex["output"],
            }
        )
    return rows
