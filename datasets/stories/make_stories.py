"""Writes the small story dataset the quickstart fine-tunes on (run by hand; deterministic).

Simple children's stories in the TinyStories style, built from templates, so the quickstart
shows a clear fall in loss within a few dozen steps on any small model.
"""
import json
import random

rng = random.Random(7)
names = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Jack"]
animals = ["cat", "dog", "bird", "bunny", "frog", "duck", "fox", "bear"]
objects = ["ball", "kite", "hat", "box", "book", "boat", "cake", "flower"]
colors = ["red", "blue", "green", "yellow", "big", "little", "shiny", "soft"]
places = ["park", "garden", "forest", "beach", "yard", "farm", "lake", "hill"]
feelings = ["happy", "sad", "scared", "excited", "surprised", "proud"]

def story():
    n, f = rng.sample(names, 2)
    a, o, c, p, e = rng.choice(animals), rng.choice(objects), rng.choice(colors), rng.choice(places), rng.choice(feelings)
    templates = [
        f"Once upon a time, there was a little {a} named {n}. {n} liked to play in the {p}. One day, {n} found a {c} {o}. {n} was very {e}. {n} showed the {o} to {f}, and they played together all day.",
        f"{n} went to the {p} with mom. {n} saw a {c} {a} under a tree. The {a} was {e}. {n} said, \"Do not be {e}, little {a}. I will be your friend.\" The {a} smiled, and they became best friends.",
        f"One day, {n} and {f} wanted to fly a {c} kite in the {p}. The wind was strong. The kite went up high in the sky. {n} felt {e}. \"Look how high it goes!\" said {f}. They laughed and ran home for dinner.",
        f"There was a {c} {o} in the {p}. {n} wanted the {o}, but {f} wanted it too. They did not want to fight. So they shared the {o} and played together. In the end, both of them were {e}.",
        f"{n} had a pet {a}. Every morning, the {a} ate breakfast with {n}. One day, the {a} ran to the {p}. {n} looked and looked. At last, {n} found the {a} next to a {c} {o}. {n} gave the {a} a big hug.",
    ]
    return rng.choice(templates)

rows = [story() for _ in range(264)]
for name, part in [("train.jsonl", rows[:240]), ("eval.jsonl", rows[240:])]:
    with open(name, "w") as fh:
        for text in part:
            fh.write(json.dumps({"text": text}) + "\n")
