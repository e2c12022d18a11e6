"""The built-in story corpus: `mmscale data synth --out DIR --stories N [--seed S]`.

A seeded generator of short children's stories, each with a one-sentence summary. A story is
told from a plan -- a hero (name, kind, trait), a friend, a place, a treasured object with a
colour, what goes wrong, how it is solved, the weather, some dialogue and an ending -- with
every part phrased in one of several ways, so stories are varied (hundreds of thousands of
possible plans) but regular enough for a small model to learn.

The summary restates the plan in other words: it never copies a sentence of its story, and it
always names the story's *core* (kind of hero, place, object and colour, what goes wrong). Cores
are drawn without repeats, so each summary fits exactly one story of the corpus; the rest of a
summary (sometimes the hero's name, the friend, the weather, the ending) varies. Retrieval
among 32 candidates therefore needs the whole summary matched against the story, in other words.

Writes `stories.txt` (stories separated by `<|endoftext|>` lines: the input of
`mmscale tokenizer train` and `mmscale prepare`) and `pairs.jsonl` (`{"query": summary,
"passage": story}`: the pairs of retrieval fine-tuning). Both are written atomically.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from mmscale.errors import UserError
from mmscale.fsutil import atomic_write

SEPARATOR = "<|endoftext|>"
MAX_STORIES = 500_000  # a quarter of the distinct cores; beyond that drawing slows down

NAMES = {
    "she": ["Lily", "Mia", "Zoe", "Emma", "Ava", "Rosa", "Nina", "Lucy", "Ella", "Ruby", "Sara", "Hana",
            "Ivy", "Maya", "Anna", "Clara", "Daisy", "Grace", "Jade", "Kira", "Lena", "Nora", "Olive", "Pia",
            "Tess", "Una", "Vera", "Wren", "Yara", "Bea", "Cora", "Dot", "Fern", "Gwen", "Iris", "June",
            "Luna", "Molly", "Poppy", "Sky"],
    "he": ["Tom", "Max", "Ben", "Leo", "Sam", "Jack", "Finn", "Omar", "Hugo", "Eli", "Noah", "Theo", "Otto",
           "Ravi", "Milo", "Adam", "Carl", "Dan", "Evan", "Felix", "Gus", "Hal", "Ian", "Jon", "Kai", "Luke",
           "Nico", "Oscar", "Pete", "Ray", "Seth", "Toby", "Vic", "Will", "Zack", "Arlo", "Bo", "Cole",
           "Dex", "Rex"],
}
# kind of hero -> how a summary may call it (never the same two words as another kind)
KINDS = {
    "girl": ["little girl", "young girl"], "boy": ["little boy", "young boy"], "cat": ["cat", "house cat"],
    "dog": ["dog", "good dog"], "bunny": ["rabbit", "bunny"], "fox": ["fox", "red fox"],
    "bear": ["bear", "bear cub"], "duck": ["duck", "little duck"], "mouse": ["mouse", "field mouse"],
    "frog": ["frog", "green frog"], "owl": ["owl", "young owl"], "pig": ["pig", "piglet"],
    "lamb": ["lamb", "young sheep"], "puppy": ["puppy", "young dog"], "kitten": ["kitten", "young cat"],
    "hen": ["hen", "chicken"], "turtle": ["turtle", "slow turtle"], "squirrel": ["squirrel", "tree squirrel"],
    "robot": ["robot", "toy robot"], "dragon": ["dragon", "baby dragon"],
}
TRAITS = ["shy", "brave", "curious", "kind", "silly", "tiny", "clever", "happy", "sleepy", "busy",
          "gentle", "noisy", "proud", "quiet", "cheerful", "grumpy"]
# place -> (a detail of it that the story mentions, how a summary may call the place)
PLACES = {
    "park": ("the swings", ["the park", "a park"]), "forest": ("the tall pines", ["the woods", "a forest"]),
    "beach": ("the waves", ["the seaside", "the beach"]), "farm": ("the red barn", ["a farm", "the farm"]),
    "garden": ("the rose bushes", ["the garden", "a garden"]),
    "school": ("the playground", ["school", "the school"]),
    "village": ("the old well", ["the village", "a small village"]),
    "meadow": ("the wild flowers", ["a meadow", "the field of flowers"]),
    "lake": ("the wooden dock", ["the lake", "a lake"]), "hill": ("the big rock", ["a hill", "the hilltop"]),
    "zoo": ("the monkey house", ["the zoo", "a zoo"]),
    "market": ("the fruit stands", ["the market", "a busy market"]),
    "library": ("the tall shelves", ["the library", "a library"]),
    "river": ("the stepping stones", ["the river", "a river"]), "cave": ("the dark tunnel", ["a cave", "the cave"]),
    "orchard": ("the apple trees", ["the orchard", "an orchard"]),
    "harbor": ("the fishing boats", ["the harbor", "the port"]),
    "jungle": ("the hanging vines", ["the jungle", "a jungle"]),
    "castle": ("the high tower", ["the castle", "an old castle"]),
    "island": ("the palm trees", ["an island", "the island"]),
    "mountain": ("the snowy path", ["the mountain", "a mountain"]),
    "pond": ("the lily pads", ["the pond", "a pond"]), "city": ("the busy streets", ["the city", "a big city"]),
    "desert": ("the sand dunes", ["the desert", "a desert"]),
    "bakery": ("the warm ovens", ["the bakery", "a bakery"]),
}
OBJECTS = ["kite", "ball", "hat", "drum", "book", "boat", "teddy bear", "scarf", "balloon", "shell", "key",
           "map", "lamp", "cup", "bell", "flute", "sock", "ribbon", "crown", "whistle", "basket", "blanket",
           "marble", "feather", "wagon", "umbrella", "toy train", "painting", "compass", "lunch box"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "golden", "silver", "white",
          "black", "brown"]
WEATHER = ["sunny", "rainy", "windy", "snowy", "cloudy", "foggy"]

# what goes wrong: story sentences (one is chosen) and summary phrases
PROBLEMS = {
    "lost": (["{Hero} looked everywhere, but the {obj} was gone.",
              "Suddenly {pron} could not find the {obj} anywhere."],
             ["loses {poss} {color} {obj}", "cannot find {poss} {color} {obj}"]),
    "tree": (["The wind lifted the {obj} and it got stuck high up in a tree.",
              "The {obj} flew up and landed on a high branch."],
             ["has to get {poss} {color} {obj} down from a tree", "sees {poss} {color} {obj} caught in a tree"]),
    "broken": (["Suddenly the {obj} fell and broke into two pieces.", "Crack! The {obj} hit a stone and broke."],
               ["needs to mend {poss} broken {color} {obj}", "breaks {poss} {color} {obj}"]),
    "water": (["A gust of wind blew the {obj} into the water, and it floated away.",
               "Splash! The {obj} fell into the water and drifted off."],
              ["must save {poss} {color} {obj} from the water", "watches {poss} {color} {obj} float away"]),
    "crow": (["A naughty crow grabbed the {obj} and flew off with it.",
              "A big black crow swooped down and took the {obj}."],
             ["chases a bird that stole {poss} {color} {obj}", "loses {poss} {color} {obj} to a thieving bird"]),
    "mud": (["The {obj} fell into the mud and was covered in dirt.",
             "{Hero} slipped, and the {obj} landed in a puddle of mud."],
            ["has to clean {poss} muddy {color} {obj}", "gets {poss} {color} {obj} all dirty"]),
    "share": (["{Friend} wanted to play with the {obj} too, and they started to argue.",
               "{Friend} grabbed the {obj}, and both of them pulled hard."],
              ["fights with a friend over {poss} {color} {obj}", "must learn to share {poss} {color} {obj}"]),
    "hidden": (["When {pron} came back, the {obj} was not where {pron} had left it.",
                "Someone had hidden the {obj} as a joke."],
               ["hunts for {poss} hidden {color} {obj}", "searches for {poss} {color} {obj} after a prank"]),
    "gift": (["{Hero} wanted to give the {obj} to grandma, but her house was very far away.",
              "Grandma was sick, and {Hero} wanted to bring her the {obj}."],
             ["sets out to take {poss} {color} {obj} to grandma", "wants grandma to have {poss} {color} {obj}"]),
    "noise": (["A loud noise came from {detail}, and {Hero} dropped the {obj} and ran.",
               "BOOM! Something rumbled near {detail}, and the {obj} fell from {poss} paws."],
              ["gets scared by a loud sound and drops {poss} {color} {obj}",
               "runs from a scary noise and leaves {poss} {color} {obj} behind"]),
}
SOLUTIONS = [
    (["{Friend} came to help, and together they fixed the problem.",
      "{Friend} ran over and said, \"Let me help you.\" Together they made it right."],
     ["with help from {Friend}", "because {Friend} helps"]),
    (["{Hero} thought hard and had a clever idea.", "Then {Hero} smiled. {Pron} had a clever plan."],
     ["by thinking of a smart plan", "using a clever idea"]),
    (["{Friend} found a long stick, and they used it together.",
      "They found a long stick under a bush and used it to reach."],
     ["using a long stick", "with the help of a stick"]),
    (["They asked a wise old owl, and the owl showed them what to do.",
      "An old owl in a tree told them what to do."],
     ["after a wise owl gives advice", "thanks to an old owl's advice"]),
    (["{Hero} did not give up and tried again and again until it worked.",
      "{Hero} tried once, then twice, then three times, and at last it worked."],
     ["by never giving up", "by trying again and again"]),
    (["{Friend} sang a happy song, and {Hero} felt brave enough to try again.",
      "\"You can do it!\" sang {Friend}, and {Hero} tried one more time."],
     ["after {Friend} sings to cheer {obj_pron} up", "when a song gives {obj_pron} courage"]),
]
ENDINGS = [
    (["In the end, {Hero} and {Friend} laughed and played until the sun went down."],
     ["and plays with {Friend} until sunset", "and the two friends play until dark"]),
    (["That night, {Hero} went to sleep with a big smile."], ["and falls asleep smiling", "and goes to bed happy"]),
    (["From that day on, {Hero} and {Friend} were best friends."],
     ["and becomes best friends with {Friend}", "and finds a best friend"]),
    (["{Hero} learned that it is good to ask for help."],
     ["and learns that asking for help is good", "and learns to ask others for help"]),
    (["They had a picnic to celebrate, with cake and juice."],
     ["and celebrates with a picnic", "and they eat cake at a picnic"]),
    (["Mom gave them warm cookies, and they ate every one."],
     ["and shares cookies from mom", "and gets warm cookies as a treat"]),
]
OPENINGS = [
    "Once upon a time, there was {a_trait} {kind} named {Hero}.",
    "There once was {a_trait} little {kind} called {Hero}.",
    "{Hero} was {a_trait} {kind} who lived near {the_place}.",
    "Long ago, {a_trait} {kind} named {Hero} lived by {the_place}.",
]
LOVES = [
    "{Pron} had {a_color} {obj} that {pron} loved very much.",
    "{Poss} favorite thing in the world was {a_color} {obj}.",
    "Every day, {pron} carried {poss} {color} {obj} everywhere.",
]
FRIENDS = [
    "{Poss} best friend was {Friend} the {fkind}.",
    "{Pron} often played with {Friend}, {a_fkind} from next door.",
    "{Friend} the {fkind} lived nearby and liked to visit.",
]
FRIEND_THINGS = [
    "{Friend} always carried {a_fcolor} {fobj}.",
    "{Friend} liked to visit {the_place2} with {a_fcolor} {fobj}.",
    "{Friend} had just come back from {the_place2}.",
]
SETTINGS = [
    "One {weather} day, {Hero} and {Friend} went to {the_place} to play near {detail}.",
    "On a {weather} morning, {Hero} walked to {the_place} and sat by {detail}.",
    "It was a {weather} day, so {Hero} took the {obj} to {the_place}.",
]
DIALOGUE = [
    "\"Look at my {obj}!\" {Hero} said to {Friend}. \"Isn't it pretty?\"",
    "\"What a nice {obj},\" said {Friend}.",
    "\"I love {weather} days,\" said {Hero}.",
    "",
]
FEELINGS = [
    "{Hero} felt very sad and began to cry.",
    "\"Oh no!\" said {Hero}. \"What will I do now?\"",
    "{Pron} did not know what to do, and {poss} eyes filled with tears.",
    "\"This is terrible,\" {Hero} said quietly.",
]
RELIEF = [
    "\"Thank you!\" said {Hero}. \"You are a good friend.\"",
    "{Hero} jumped up and down with joy.",
    "\"We did it!\" shouted {Friend}.",
    "{Hero} hugged the {obj} and smiled.",
]
# joins what goes wrong to how it is put right (picked without drawing from the story's random
# stream, so that the stories themselves do not depend on how summaries are phrased)
CONNECTORS = ["and sorts it out", "and makes it right", "but fixes things", "and solves the problem"]
# a summary: who (sometimes named), the core, then optional extras
SUMMARY_FORMS = [
    "{who} {problem} at {where} {solution}, {ending}.",
    "On a {weather} day at {where}, {who} {problem} {solution}.",
    "At {where}, {who} {problem} {solution}, {ending}.",
    "This is a story about {who} who {problem} at {where} {solution}.",
    "{who} {problem} at {where} on a {weather} day {solution}, {ending}.",
]


@dataclass
class Story:
    text: str
    summary: str
    plan: dict = field(default_factory=dict)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _draw_plan(rng: random.Random) -> dict:
    kind = rng.choice(list(KINDS))
    pron = "she" if kind == "girl" else "he" if kind == "boy" else rng.choice(["she", "he"])
    hero = rng.choice(NAMES[pron])
    friend = rng.choice([n for n in NAMES[rng.choice(["she", "he"])] if n != hero])
    return dict(hero=hero, pron=pron, kind=kind, trait=rng.choice(TRAITS), friend=friend,
                fkind=rng.choice([k for k in KINDS if k != kind]), place=rng.choice(list(PLACES)),
                obj=rng.choice(OBJECTS), color=rng.choice(COLORS), weather=rng.choice(WEATHER),
                # the friend's own object and a second place: the same kinds of words in other roles,
                # so matching a summary takes more than counting shared words
                fobj=rng.choice(OBJECTS), fcolor=rng.choice(COLORS), place2=rng.choice(list(PLACES)),
                problem=rng.choice(list(PROBLEMS)), solution=rng.randrange(len(SOLUTIONS)),
                ending=rng.randrange(len(ENDINGS)))


def core_of(plan: dict) -> tuple:
    """What every summary states; unique across a corpus, so a summary fits one story."""
    return plan["kind"], plan["place"], plan["obj"], plan["color"], plan["problem"]


def _tell(plan: dict, rng: random.Random) -> Story:
    poss, obj_pron = ("her", "her") if plan["pron"] == "she" else ("his", "him")
    place = plan["place"]
    v = dict(Hero=plan["hero"], Friend=plan["friend"], kind=plan["kind"], fkind=plan["fkind"],
             a_trait=_a(plan["trait"]), a_fkind=_a(plan["fkind"]), the_place=f"the {place}",
             detail=PLACES[place][0], obj=plan["obj"], color=plan["color"], a_color=_a(plan["color"]),
             weather=plan["weather"], fobj=plan["fobj"], a_fcolor=_a(plan["fcolor"]),
             the_place2=f"the {plan['place2']}", pron=plan["pron"], poss=poss, obj_pron=obj_pron,
             Pron=plan["pron"].capitalize(), Poss=poss.capitalize())
    problem_sentences, problem_phrases = PROBLEMS[plan["problem"]]
    solution_sentences, solution_phrases = SOLUTIONS[plan["solution"]]
    ending_sentences, ending_phrases = ENDINGS[plan["ending"]]
    if plan["problem"] == "noise" and plan["kind"] in ("girl", "boy", "robot"):
        problem_sentences = problem_sentences[:1]  # no paws
    paragraphs = [
        [rng.choice(OPENINGS), rng.choice(LOVES), rng.choice(FRIENDS), rng.choice(FRIEND_THINGS),
         rng.choice(SETTINGS), rng.choice(DIALOGUE)],
        [rng.choice(problem_sentences), rng.choice(FEELINGS), rng.choice(solution_sentences)],
        [rng.choice(RELIEF), rng.choice(ending_sentences)],
    ]
    text = "\n".join(" ".join(s.format(**v) for s in p if s) for p in paragraphs)
    trait_kind = f"{plan['trait']} {rng.choice(KINDS[plan['kind']])}"
    # the hero's name is in two summaries out of three
    who = rng.choice([f"{plan['hero']}, {_a(trait_kind)},", _a(trait_kind), f"{_a(trait_kind)} named {plan['hero']}"])
    summary = rng.choice(SUMMARY_FORMS).format(
        who=who, where=rng.choice(PLACES[place][1]), weather=plan["weather"],
        problem=rng.choice(problem_phrases).format(**v),
        solution=CONNECTORS[(plan["solution"] + len(plan["hero"])) % len(CONNECTORS)] + " "
        + rng.choice(solution_phrases).format(**v),
        ending=rng.choice(ending_phrases).format(**v))
    summary = _cap(summary)
    return Story(text=text, summary=summary, plan=plan)


def generate_stories(n: int, seed: int = 0) -> list[Story]:
    """`n` stories with distinct cores (hence distinct, identifying summaries), reproducible from `seed`."""
    if not 1 <= n <= MAX_STORIES:
        raise UserError(f"--stories must be between 1 and {MAX_STORIES}, got {n}")
    rng = random.Random(seed)
    cores: set[tuple] = set()
    stories: list[Story] = []
    while len(stories) < n:
        plan = _draw_plan(rng)
        if core_of(plan) in cores:
            continue
        cores.add(core_of(plan))
        stories.append(_tell(plan, rng))
    return stories


def write_corpus(out: str | os.PathLike, n: int, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write stories.txt and pairs.jsonl into `out`, each atomically (temp file + rename)."""
    out = Path(out)
    targets = [out / "stories.txt", out / "pairs.jsonl"]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise UserError(f"'{t}' already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; pass a directory")
    stories = generate_stories(n, seed)
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        targets[0]: "".join(f"{s.text}\n{SEPARATOR}\n" for s in stories),
        targets[1]: "".join(json.dumps({"query": s.summary, "passage": s.text}) + "\n" for s in stories),
    }
    for path, content in contents.items():
        atomic_write(path, content)
    return out
