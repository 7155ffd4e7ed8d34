"""The `videoxl_needle` tasks: synthetic needle videos with four-option questions of every kind (retrieval,
ordering, counting), written by `scripts/write_eval_data.py` from `demo.synth`. A doc:
`{"video": absolute path, "question": prompt + lettered options + instruction, "options": [4 texts],
"answer": letter, "kind": ..., "frames": F, "depth": percent}`."""

import re
from typing import Any

LETTERS = "ABCD"


def doc_to_visual(doc: dict) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["options"])


def doc_to_target_index(doc: dict) -> int:
    return LETTERS.index(doc["answer"])


def answer_letter(reply: str, options: list[str]) -> str | None:
    """The option letter a free-form reply names, as the repo's needle harness scores it: the first standalone
    A-D; failing that, the letter of the option whose text the reply is."""
    match = re.search(r"\b([A-D])\b", reply)
    if match:
        return match.group(1)
    said = " ".join(reply.lower().split()).strip(" .")
    return next((letter for letter, option in zip(LETTERS, options) if option.strip().lower() == said), None)


def process_results(doc: dict, results: list[Any]) -> dict[str, float]:
    return {"accuracy": float(answer_letter(results[0], doc["options"]) == doc["answer"])}
