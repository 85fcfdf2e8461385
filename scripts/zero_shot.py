"""The untrained model's score on a run's evaluation split: what round 0 of that run will report, without a run.

    python -m scripts.zero_shot -c "model='smollm2' task='sst2' data-dir='../shared/data/glue' eval.max-examples=300"
    python -m scripts.zero_shot -c "..." --template "Review: {text}\\nSentiment (negative or positive):"

--template replaces the task's LM-head prompt (a built-in task's too), to compare prompts before a long run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import parse_run_config
from common.data import task_of
from common.evaluation import evaluate
from common.modeling import load_tokenizer
from common.runmodel import load_run_model
from common.training import dev_encoded, dev_examples, encode_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--run-config", default="", help="run-config overrides, as for fedsubspace simulate")
    ap.add_argument("--template", default="", help="another LM-head prompt ({text}, {text_pair}, {choices})")
    args = ap.parse_args(argv)
    from flwr.common.config import parse_config_args

    cfg = parse_run_config(parse_config_args([args.run_config]) if args.run_config else {})
    task = task_of(cfg)
    if args.template:
        task = dataclasses.replace(task, template=args.template)
    dev = encode_run(cfg, dev_examples(cfg, task), task) if args.template else dev_encoded(cfg)
    result = evaluate(load_run_model(cfg).model, dev, task, cfg.eval.batch_size, cfg.eval, load_tokenizer(cfg.model))
    print(json.dumps({"template": task.template, "examples": len(dev["labels"]), **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
