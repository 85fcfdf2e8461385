"""Which head input and which label texts give the embedded MiniLM a useful start (head.pooling, head.init).

For each task, pooling ([CLS] token, mean over tokens, BERT's pooler) and candidate label texts: the zero-shot
accuracy on the dev split of the label-word head (nearest label text by cosine), and a logistic-regression
probe on 2,000 training examples (the best a head alone can do on those features).

    python -m bench.zo_head_probe --data-dir ../shared/data/glue [--tasks sst2 rte]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from common.data import load_split
from common.modeling import default_model_path
from common.tasks import get_task

CANDIDATES = {
    "sst2": [("negative", "positive"), ("terrible", "great"), ("bad", "good")],
    "rte": [("yes", "no"), ("entailment", "contradiction")],
}
TEMPLATES = {"sst2": ("{}", "It was {}."), "rte": ("{}",)}


def linear_probe(x: torch.Tensor, y: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor) -> float:
    """Dev accuracy of an L2-regularised logistic regression fitted by L-BFGS on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_dev = (x - mu) / sd, (x_dev - mu) / sd
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(x_dev).argmax(1) == y_dev).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    ap.add_argument("--tasks", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def features(texts, pairs=None, bs=64):
        out = {"cls": [], "mean": [], "pooler": []}
        for i in range(0, len(texts), bs):
            enc = tok(texts[i : i + bs], pairs[i : i + bs] if pairs else None, truncation=True, max_length=128,
                      padding=True, return_tensors="pt")  # fmt: skip
            o = net(**enc)
            m = enc["attention_mask"].unsqueeze(-1).float()
            out["cls"].append(o.last_hidden_state[:, 0])
            out["mean"].append((o.last_hidden_state * m).sum(1) / m.sum(1))
            out["pooler"].append(o.pooler_output)
        return {k: torch.cat(v) for k, v in out.items()}

    for name in args.tasks:
        task = get_task(name)
        dev = load_split(task, "dev", args.data_dir)
        train = load_split(task, "train", args.data_dir).shuffle(seed=0).select(range(2000))
        pairs = (lambda d: list(d["text_pair"])) if task.is_pair else (lambda d: None)
        f_dev, f_train = features(list(dev["text"]), pairs(dev)), features(list(train["text"]), pairs(train))
        y_dev, y_train = np.array(dev["label"]), np.array(train["label"])
        print(f"## {name} (dev {len(y_dev)}, majority {max(np.mean(y_dev), 1 - np.mean(y_dev)):.3f})")
        for pooling in ("cls", "mean", "pooler"):
            fd = torch.nn.functional.normalize(f_dev[pooling], dim=1)
            for words in CANDIDATES[name]:
                for template in TEMPLATES[name]:
                    e = torch.nn.functional.normalize(features([template.format(w) for w in words])[pooling], dim=1)
                    acc = float(np.mean((fd @ e.T).argmax(1).numpy() == y_dev))
                    print(f"{pooling:6s} {template.format('/'.join(words)):32s} zero-shot {100 * acc:.1f}")
            acc = linear_probe(f_train[pooling], torch.as_tensor(y_train), f_dev[pooling], torch.as_tensor(y_dev))
            print(f"{pooling:6s} linear probe (2,000 train examples)    {100 * acc:.1f}")


if __name__ == "__main__":
    main()
