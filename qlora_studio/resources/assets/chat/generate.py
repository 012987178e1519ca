"""Generate the small chat sample (train.jsonl next to this script, in qlora_studio/resources/assets/chat):
a kitchen assistant, "Pantry".

Deterministic (seeded) and self-checking: every answer is computed, so the data is correct and its
style is consistent, which is what a few hundred rows of fine-tuning can teach a small model. Run
``python qlora_studio/resources/assets/chat/generate.py`` (from the repository root) to rebuild the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = ("You are Pantry, a friendly kitchen assistant. Answer in one or two short sentences, "
          "and give both the metric and the US amount when you convert.")

WEIGHTS = {  # unit: grams
    "ounce": 28.35, "pound": 453.6,
}
VOLUMES = {  # unit: millilitres
    "cup": 240.0, "tablespoon": 15.0, "teaspoon": 5.0, "fluid ounce": 29.6, "pint": 473.0,
}
INGREDIENT_CUP_GRAMS = {  # grams per US cup
    "flour": 125, "sugar": 200, "brown sugar": 220, "butter": 227, "rice": 185, "oats": 90,
    "cocoa powder": 85, "honey": 340, "milk": 245, "water": 240,
}
SUBSTITUTES = [
    ("buttermilk", "1 cup of milk with 1 tablespoon of lemon juice or vinegar, left for 5 minutes"),
    ("an egg in baking", "1 tablespoon of ground flaxseed mixed with 3 tablespoons of water"),
    ("baking powder", "1/4 teaspoon of baking soda plus 1/2 teaspoon of cream of tartar per teaspoon"),
    ("brown sugar", "1 cup of white sugar with 1 tablespoon of molasses"),
    ("sour cream", "the same amount of plain Greek yogurt"),
    ("self-raising flour", "1 cup of plain flour with 1 1/2 teaspoons of baking powder and a pinch of salt"),
    ("fresh herbs", "a third as much of the dried herb"),
    ("cake flour", "1 cup of plain flour minus 2 tablespoons, topped up with 2 tablespoons of cornstarch"),
]


def plural(n: float, unit: str) -> str:
    return unit if n <= 1 else (unit + "es" if unit.endswith("ch") else unit + "s")


def fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 20 else f"{x:.1f}".rstrip("0").rstrip(".")


def weight_row(rnd: random.Random) -> list[dict]:
    unit = rnd.choice(list(WEIGHTS))
    n = rnd.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 16])
    grams = n * WEIGHTS[unit]
    q = rnd.choice([f"How many grams is {n} {plural(n, unit)}?", f"Convert {n} {plural(n, unit)} to grams.",
                    f"My recipe says {n} {plural(n, unit)}. What is that in grams?"])
    a = f"{n} {plural(n, unit)} is about {fmt(grams)} g (1 {unit} ≈ {WEIGHTS[unit]:g} g)."
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def volume_row(rnd: random.Random) -> list[dict]:
    unit = rnd.choice(list(VOLUMES))
    n = rnd.choice([1, 2, 3, 4, 0.5, 1.5, 0.25])
    ml = n * VOLUMES[unit]
    shown = {0.5: "1/2", 1.5: "1 1/2", 0.25: "1/4"}.get(n, str(n))
    q = rnd.choice([f"How many millilitres are in {shown} {plural(n, unit)}?",
                    f"What is {shown} {plural(n, unit)} in ml?"])
    a = f"{shown} {plural(n, unit)} is about {fmt(ml)} ml (1 {unit} ≈ {VOLUMES[unit]:g} ml)."
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def cups_row(rnd: random.Random) -> list[dict]:
    ing = rnd.choice(list(INGREDIENT_CUP_GRAMS))
    n = rnd.choice([1, 2, 3, 0.5, 1.5, 0.25])
    shown = {0.5: "1/2", 1.5: "1 1/2", 0.25: "1/4"}.get(n, str(n))
    grams = n * INGREDIENT_CUP_GRAMS[ing]
    q = rnd.choice([f"How much does {shown} {plural(n, 'cup')} of {ing} weigh?",
                    f"I don't have measuring cups. How many grams is {shown} {plural(n, 'cup')} of {ing}?"])
    a = (f"{shown} {plural(n, 'cup')} of {ing} weighs about {fmt(grams)} g "
         f"(one cup of {ing} is about {INGREDIENT_CUP_GRAMS[ing]} g).")
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def oven_row(rnd: random.Random) -> list[dict]:
    if rnd.random() < 0.5:
        f = rnd.choice([300, 325, 350, 375, 400, 425, 450])
        c = (f - 32) * 5 / 9
        q = rnd.choice([f"What is {f}°F in Celsius?", f"My oven is in Celsius. The recipe says {f} F."])
        a = f"{f}°F is about {c:.0f}°C; for a fan oven, go about 20 degrees lower ({c - 20:.0f}°C)."
    else:
        c = rnd.choice([150, 160, 170, 180, 190, 200, 220])
        f = c * 9 / 5 + 32
        q = rnd.choice([f"What is {c}°C in Fahrenheit?", f"Convert {c} C to F for my oven."])
        a = f"{c}°C is about {f:.0f}°F."
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def substitute_row(rnd: random.Random) -> list[dict]:
    what, how = rnd.choice(SUBSTITUTES)
    q = rnd.choice([f"What can I use instead of {what}?", f"I ran out of {what}. Any substitute?"])
    return [{"role": "user", "content": q}, {"role": "assistant", "content": f"Use {how}."}]


def scaled_followup(rnd: random.Random) -> list[dict]:
    """Two turns: a conversion, then the same amount scaled."""
    ing = rnd.choice(list(INGREDIENT_CUP_GRAMS))
    grams = INGREDIENT_CUP_GRAMS[ing]
    k = rnd.choice([2, 3, 4])
    return [
        {"role": "user", "content": f"How many grams is one cup of {ing}?"},
        {"role": "assistant", "content": f"One cup of {ing} is about {grams} g."},
        {"role": "user", "content": f"And if I make the recipe {k} times bigger?"},
        {"role": "assistant", "content": f"Then use {k} cups, about {k * grams} g of {ing}."},
    ]


def main(n: int = 240, seed: int = 7) -> None:
    rnd = random.Random(seed)
    makers = [weight_row, volume_row, cups_row, cups_row, oven_row, substitute_row, scaled_followup]
    out = Path(__file__).with_name("train.jsonl")
    seen = set()
    rows = []
    while len(rows) < n:
        turns = rnd.choice(makers)(rnd)
        key = json.dumps(turns)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": [{"role": "system", "content": SYSTEM}] + turns})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
