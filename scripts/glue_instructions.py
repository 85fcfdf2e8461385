"""Instruction data offline from the GLUE/SuperGLUE files: each example as its task's prompt and its label word as
the response (the built-in templates and words of common/tasks.py), one JSON object a line.

    python -m scripts.glue_instructions sst2 sst2-instructions.jsonl --rows 2000 [--split dev] [--data-dir DIR]

A file a run reads as `task` (an instruction task: the loss on the answer word, scored by exact match of the
generated word). BoolQ offline has its validation file only: its "train" and "dev" are the 80/20 cut of it
(common/data.py).
"""

from __future__ import annotations

import argparse
import json
import os

from common.data import load_split
from common.tasks import TASKS


def rows(task_name: str, split: str, data_dir: str, limit: int) -> list[dict[str, str]]:
    task = TASKS[task_name]
    ds = load_split(task, split, data_dir)
    choices = " or ".join(w.strip() for w in task.lm_words)
    pairs = ds["text_pair"] if task.is_pair else [""] * len(ds)
    out = []
    for text, pair, label in list(zip(ds["text"], pairs, ds["label"], strict=True))[: limit or None]:
        prompt = task.template.format(text=text, text_pair=pair, choices=choices).rstrip(":").rstrip()
        out.append({"prompt": f"{prompt}\nAnswer with one word: {choices}.", "response": task.lm_words[label].strip()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("out")
    ap.add_argument("--split", default="train", choices=("train", "dev"))
    ap.add_argument("--rows", type=int, default=0, help="the first N examples (0: all)")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    args = ap.parse_args(argv)
    made = rows(args.task, args.split, args.data_dir, args.rows)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in made)
    print(f"{len(made)} examples -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
