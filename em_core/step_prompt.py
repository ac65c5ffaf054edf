"""Each token step's prompt for the concepts it drew: Break-A-Scene's "a photo of [v1] and [v3]",
or the image prompt's own wording with the concepts not drawn left out.

Why the second: a prompt's wording tells the model what each concept is (the concept after "on" is
what the rest stand on), and the first mask estimate reads that from the image prompt. BaS's form
drops it, so tokens that nothing else anchors (random init) are free to trade places, and the next
refresh finds them swapped (issue 14; benchmarks/README.md, "The step prompt's wording").
"""
from __future__ import annotations

from .concepts import CONCEPT_RE

FORMS = ("bas", "image")


def step_prompt(image_prompt: str, subset: list[str], form: str = "bas") -> str:
    """The prompt for the drawn `subset` of an image's concepts.

    "bas": "a photo of " + the subset joined by " and ", in the subset's order.
    "image": the image prompt with each concept not drawn cut out together with the words that led
    up to it from the concept before; a drawn concept that follows a cut one keeps its own leading
    words ("a photo of [v1] and [v2] on [v3]", drawn [v1] and [v3]: "a photo of [v1] on [v3]";
    drawn [v3]: "a photo of [v3]"). Concepts keep the image prompt's order.
    """
    if form == "bas":
        return "a photo of " + " and ".join(subset)
    if form != "image":
        raise ValueError(f"step prompt form {form!r}: choose one of {', '.join(FORMS)}")
    parts = CONCEPT_RE.split(image_prompt)  # text, N, text, N, ..., text
    texts, names = parts[0::2], [f"[v{n}]" for n in parts[1::2]]
    missing = [n for n in subset if n not in names]
    if missing:
        raise ValueError(f"step prompt: {', '.join(missing)} not in the image prompt {image_prompt!r}")
    out, kept_any = texts[0], False
    for name, before in zip(names, texts[:-1]):
        if name not in subset:
            continue
        out += (before if kept_any else "") + name
        kept_any = True
    return out + texts[-1]
