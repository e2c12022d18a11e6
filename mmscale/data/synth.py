"""The built-in story corpus: `mmscale data synth --out DIR --stories N [--seed S]`.

A seeded generator of short children's stories, each with a one-sentence summary. Every story is
built from a plan (hero, kind, friend, place, treasured object, what goes wrong, how it is solved,
the weather, the ending) and is told with randomly chosen phrasings, so stories are varied but
regular enough for a small model to learn. The summary restates the plan in other words (it
never copies a sentence of the story), and plans are drawn without repeats so that no two
stories share a summary.

Writes `stories.txt` (stories separated by `<|endoftext|>` lines, the input of
`mmscale tokenizer train` and `mmscale prepare`) and `pairs.jsonl` (`{"query": summary,
"passage": story}`, the pairs of retrieval fine-tuning).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from mmscale.errors import UserError

SEPARATOR = "<|endoftext|>"

NAMES = {
    "she": ["Lily", "Mia", "Zoe", "Emma", "Ava", "Rosa", "Nina", "Lucy", "Ella", "Ruby", "Sara",
            "Hana", "Ivy", "Maya", "Anna", "Clara", "Daisy", "Grace", "Jade", "Kira", "Lena", "Nora",
            "Olive", "Pia", "Tess", "Una", "Vera", "Wren", "Yara", "Bea", "Cora", "Dot", "Fern",
            "Gwen", "Iris", "June", "Luna", "Molly", "Poppy", "Sky"],
    "he": ["Tom", "Max", "Ben", "Leo", "Sam", "Jack", "Finn", "Omar", "Hugo", "Eli", "Noah", "Theo",
           "Otto", "Ravi", "Milo", "Adam", "Carl", "Dan", "Evan", "Felix", "Gus", "Hal", "Ian", "Jon",
           "Kai", "Luke", "Nico", "Oscar", "Pete", "Ray", "Seth", "Toby", "Vic", "Will", "Zack",
           "Arlo", "Bo", "Cole", "Dex", "Rex"],
}
# (kind, pronoun set) -- the hero can be a child or an animal
KINDS = ["girl", "boy", "cat", "dog", "bunny", "fox", "bear", "duck", "mouse", "frog", "owl",
         "pig", "lamb", "puppy", "kitten", "hen", "turtle", "squirrel", "robot", "dragon"]
TRAITS = ["shy", "brave", "curious", "kind", "silly", "tiny", "clever", "happy", "sleepy",
          "busy", "gentle", "noisy", "proud", "quiet", "cheerful", "grumpy"]
PLACES = {  # place -> a detail of it used in the story text
    "park": "the swings", "forest": "the tall pines", "beach": "the waves", "farm": "the red barn",
    "garden": "the rose bushes", "school": "the playground", "village": "the old well",
    "meadow": "the wild flowers", "lake": "the wooden dock", "hill": "the big rock",
    "zoo": "the monkey house", "market": "the fruit stands", "library": "the tall shelves",
    "river": "the stepping stones", "cave": "the dark tunnel", "playground": "the slide",
    "orchard": "the apple trees", "harbor": "the fishing boats", "jungle": "the hanging vines",
    "castle": "the high tower", "island": "the palm trees", "mountain": "the snowy path",
    "pond": "the lily pads", "city": "the busy streets", "desert": "the sand dunes",
}
OBJECTS = ["kite", "ball", "hat", "drum", "book", "boat", "teddy bear", "scarf", "balloon",
           "shell", "key", "map", "lamp", "cup", "bell", "flute", "sock", "ribbon", "crown",
           "whistle", "basket", "blanket", "marble", "feather", "wagon", "umbrella", "toy train",
           "jar of honey", "painting", "compass"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "golden", "silver",
          "white", "black", "brown"]
WEATHER = ["sunny", "rainy", "windy", "snowy", "cloudy", "foggy"]

# what goes wrong: (event id, story sentence template, summary phrase template)
PROBLEMS = [
    ("lost", "{Hero} looked everywhere, but the {obj} was gone.", "loses {poss} {color} {obj}"),
    ("stuck", "The {obj} got stuck high up in a tree.", "gets {poss} {color} {obj} out of a tree"),
    ("broken", "Suddenly the {obj} fell and broke into two pieces.", "mends {poss} broken {color} {obj}"),
    ("river", "A gust of wind blew the {obj} into the water, and it floated away.",
     "saves {poss} {color} {obj} from the water"),
    ("taken", "A naughty crow grabbed the {obj} and flew off with it.",
     "chases a crow that took {poss} {color} {obj}"),
    ("dirty", "The {obj} fell into the mud and was covered in dirt.", "cleans {poss} muddy {color} {obj}"),
    ("share", "{Friend} wanted the {obj} too, and they started to argue.",
     "learns to share {poss} {color} {obj}"),
    ("hidden", "When {pron} woke up, the {obj} was not where {pron} had left it.",
     "searches for {poss} {color} {obj} that someone hid"),
    ("gift", "{Hero} wanted to give the {obj} to {poss} grandma, but it was too far to walk.",
     "brings a {color} {obj} to grandma"),
    ("scared", "A loud noise came from {detail}, and {Hero} dropped the {obj} and ran.",
     "is frightened by a noise and drops {poss} {color} {obj}"),
]
# how it is solved (story sentence, summary phrase)
SOLUTIONS = [
    ("{Friend} the {fkind} came to help, and together they fixed the problem.",
     "with help from {Friend} the {fkind}"),
    ("{Hero} thought hard and had a clever idea.", "by thinking of a clever idea"),
    ("{Friend} the {fkind} found a long stick, and they used it together.",
     "with a stick and {Friend} the {fkind}"),
    ("They asked a wise old owl, and the owl showed them what to do.",
     "after asking a wise owl, together with {Friend} the {fkind}"),
    ("{Hero} did not give up and tried again and again until it worked.",
     "by trying again and again while {Friend} the {fkind} cheers"),
    ("{Friend} the {fkind} sang a song to make {obj_pron} feel brave, and then they tried once more.",
     "after {Friend} the {fkind} sings a brave song"),
]
ENDINGS = [
    ("In the end, {Hero} and {Friend} laughed and played until the sun went down.", "and they play until sunset"),
    ("That night, {Hero} went to sleep with a big smile.", "and goes to bed smiling"),
    ("From that day on, {Hero} and {Friend} were best friends.", "and they become best friends"),
    ("{Hero} learned that it is good to ask for help.", "and learns to ask for help"),
    ("They had a picnic to celebrate, with cake and juice.", "and they celebrate with a picnic"),
    ("Mom gave them warm cookies, and they ate them all.", "and they eat warm cookies"),
]
OPENINGS = [
    "Once upon a time, there was a {trait} {kind} named {Hero}.",
    "There once was a {trait} little {kind} called {Hero}.",
    "{Hero} was a {trait} {kind} who lived near the {place}.",
    "Long ago, a {trait} {kind} named {Hero} lived by the {place}.",
]
LOVES = [
    "{Pron} had a {color} {obj} that {pron} loved very much.",
    "{Poss} favorite thing in the world was a {color} {obj}.",
    "Every day, {pron} carried {poss} {color} {obj} everywhere.",
]
FRIENDS = [
    "{Poss} best friend was {Friend} the {fkind}.",
    "{Pron} often played with {Friend}, a {fkind} from next door.",
    "{Friend} the {fkind} was {poss} best friend.",
]
SETTINGS = [
    "One {weather} day, {Hero} went to the {place} to play near {detail}.",
    "On a {weather} morning, {Hero} walked to the {place} and sat by {detail}.",
    "It was a {weather} day, so {Hero} took the {obj} to the {place}.",
]
FEELINGS = [
    "{Hero} felt very sad and began to cry.",
    '"Oh no!" said {Hero}. "What will I do now?"',
    "{Pron} did not know what to do, and {poss} eyes filled with tears.",
    '"This is terrible," {Hero} said quietly.',
]
RELIEF = [
    '"Thank you!" said {Hero}. "You are a good friend."',
    "{Hero} jumped up and down with joy.",
    '"We did it!" shouted {Friend}.',
    "{Hero} hugged the {obj} and smiled.",
]
SUMMARY_FORMS = [
    "A {trait} {kind} named {Hero} {problem} at the {place} on a {weather} day {solution}, {ending}.",
    "On a {weather} day at the {place}, {Hero}, a {trait} {kind}, {problem} {solution}, {ending}.",
    "In this story a {trait} {kind} called {Hero} {problem} near the {place} {solution} on a {weather} day, {ending}.",
]


@dataclass
class Story:
    text: str
    summary: str


def _pronouns(kind: str, rng: random.Random) -> tuple[str, str, str]:
    if kind == "girl":
        gender = "she"
    elif kind == "boy":
        gender = "he"
    else:
        gender = rng.choice(["she", "he"])
    return (gender, "her", "her") if gender == "she" else (gender, "his", "him")


def _story(rng: random.Random) -> tuple[tuple, Story]:
    kind = rng.choice(KINDS)
    pron, poss, obj_pron = _pronouns(kind, rng)
    hero = rng.choice(NAMES[pron])
    friend = rng.choice([n for n in NAMES[rng.choice(["she", "he"])] if n != hero])
    fkind = rng.choice([k for k in KINDS if k != kind])
    place = rng.choice(list(PLACES))
    obj, color, trait, weather = rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(TRAITS), rng.choice(WEATHER)
    p_i, s_i, e_i = rng.randrange(len(PROBLEMS)), rng.randrange(len(SOLUTIONS)), rng.randrange(len(ENDINGS))
    # the plan is what the summary says; two stories with the same plan would share a summary
    plan = (hero, kind, trait, friend, fkind, place, obj, color, weather, p_i, s_i, e_i)
    v = dict(Hero=hero, Friend=friend, kind=kind, fkind=fkind, trait=trait, place=place,
             detail=PLACES[place], obj=obj, color=color, weather=weather, pron=pron, poss=poss,
             obj_pron=obj_pron, Pron=pron.capitalize(), Poss=poss.capitalize())
    sentences = [
        rng.choice(OPENINGS), rng.choice(LOVES), rng.choice(FRIENDS), rng.choice(SETTINGS),
        PROBLEMS[p_i][1], rng.choice(FEELINGS), SOLUTIONS[s_i][0], rng.choice(RELIEF), ENDINGS[e_i][0],
    ]
    summary = rng.choice(SUMMARY_FORMS).format(
        problem=PROBLEMS[p_i][2].format(**v), solution=SOLUTIONS[s_i][1].format(**v),
        ending=ENDINGS[e_i][1].format(**v), **v)
    s = [x.format(**v) for x in sentences]
    # three paragraphs, as in TinyStories: the set-up, the trouble, the end
    text = " ".join(s[:4]) + "\n" + " ".join(s[4:7]) + "\n" + " ".join(s[7:])
    return plan, Story(text=text, summary=summary)


def generate_stories(n: int, seed: int = 0) -> list[Story]:
    """`n` stories with distinct plans (hence distinct summaries), reproducible from `seed`."""
    if n < 1:
        raise UserError(f"--stories must be at least 1, got {n}")
    rng = random.Random(seed)
    seen: set[tuple] = set()
    stories: list[Story] = []
    attempts = 0
    while len(stories) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise UserError(f"could not draw {n} distinct stories; pass a smaller --stories")
        plan, story = _story(rng)
        # distinct plans give distinct stories; the summary must be unique on its own as well
        if plan in seen or story.summary in seen:
            continue
        seen.add(plan)
        seen.add(story.summary)
        stories.append(story)
    return stories


def write_corpus(out: str | os.PathLike, n: int, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write stories.txt and pairs.jsonl into `out` (atomically per file)."""
    out = Path(out)
    targets = [out / "stories.txt", out / "pairs.jsonl"]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise UserError(f"'{t}' already exists; pass --overwrite or choose another --out")
    stories = generate_stories(n, seed)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        targets[0]: "".join(f"{s.text}\n{SEPARATOR}\n" for s in stories),
        targets[1]: "".join(json.dumps({"query": s.summary, "passage": s.text}) + "\n" for s in stories),
    }
    for path, content in texts.items():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    return out


# ---------------------------------------------------------------------------------------------
# `mmscale data`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("synth", help="write the built-in story corpus (stories.txt + pairs.jsonl)")
    s.add_argument("--out", required=True, help="directory to write into")
    s.add_argument("--stories", type=int, default=20000, help="number of stories")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace existing stories.txt / pairs.jsonl")


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        out = write_corpus(args.out, args.stories, args.seed, overwrite=args.overwrite)
        print(f"wrote {args.stories} stories to {out / 'stories.txt'} and {out / 'pairs.jsonl'}",
              file=sys.stdout)
        return 0
    raise UserError(f"unknown action {args.action!r}; use `mmscale data synth`")
