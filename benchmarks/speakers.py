"""Unseen-speaker benchmark (issue 14): contrastive pretraining on spoken-digits-dev, one
speaker held out per fold.

    python benchmarks/speakers.py [--corpus ../shared/data/spoken-digits-dev]
                                  [--configs clip,clip-long,label-free,supervised]
                                  [--folds jackson,yweweler,nicolas,theo] [--seeds 0]

The corpus pairs a handwritten digit image, a real recording of the digit spoken by one
of five speakers, and a caption. Each fold builds a store with the test speaker and a
validation speaker pinned (``split.groups``, ``VALIDATION``), the rest training, and the weight-free
``inputs`` feature set (32 px pixels, 40-bin log-mel, byte-level text ids). Each config
then trains the same three towers with ``jobs.pretrain.step.Stepper`` (the step
``mmfp train`` runs in every Ray Train worker: same loss, augmentations and schedule) in
this process, one worker, one thread, and scores the held-out speaker: class-match
recall@1 (is the nearest item of the other modality the same digit? chance 0.1) for
audio->image and image->audio, and the mean over all six directions. Image and audio are
paired by digit only, so instance recall is capped near 1/100 and is not reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks._common import print_table  # noqa: E402

SPEAKERS = ("jackson", "lucas", "nicolas", "theo", "yweweler")
VALIDATION = {"jackson": "nicolas", "yweweler": "theo", "nicolas": "yweweler", "theo": "lucas",
              "lucas": "jackson"}  # fmt: skip
TOWERS = {
    "image": {"kind": "cnn", "input": "image_pixels", "channels": [32, 64, 128], "out_dim": 64},
    "audio": {"kind": "cnn", "input": "audio_logmel", "channels": [32, 64, 128], "out_dim": 64},
    "text": {"kind": "transformer", "input": "text_ids", "width": 64, "layers": 1, "heads": 4,
             "out_dim": 64},
}  # fmt: skip
CONFIGS: dict[str, dict[str, Any]] = {
    # CLIP's loss, as the user ran it: 40 epochs, and longer
    "clip": {"epochs": 40, "loss": {"duplicates": "negative"}},
    "clip-long": {"epochs": 120, "loss": {"duplicates": "negative"}},
    # no labels: identical captions are positives, SpecAugment + shift + gain on audio
    "label-free": {"epochs": 120, "augment": {"audio": {}}},
    # labels used: the same plus a supervised-contrastive term
    "supervised": {"epochs": 120, "augment": {"audio": {}}, "loss": {"supervised_weight": 0.5}},
}


def build_fold(corpus: Path, work: Path, test: str) -> Path:
    """A store of the corpus with ``test`` held out and another speaker as validation."""
    from pipelines.build import Execution, build
    from pipelines.spec import parse_spec

    val = VALIDATION[test]
    spec = parse_spec({
        "name": f"speakers-{test}",
        "sources": [{"kind": "manifest", "uri": str(corpus / "manifest.jsonl"), "name": "sd"}],
        "split": {"ratios": {"train": 1.0}, "groups": {"test": [test], "val": [val]}},
        "encode": {"feature_sets": [{"name": "inputs", "encoders": [
            {"name": "image_pixels", "params": {"size": 32}},
            {"name": "audio_logmel", "params": {"n_mels": 40, "frames": 100}},
            {"name": "text_ids", "params": {"max_length": 24, "lowercase": True}},
        ]}]},
        "store": {"uri": str(work / f"store-{test}")},
    })  # fmt: skip
    build(spec, execution=Execution(small_in_process=True))
    return work / f"store-{test}"


def train_and_score(store: Path, over: dict[str, Any], seed: int) -> dict[str, float]:
    import numpy as np
    import torch

    from features.store import FeatureStore
    from jobs.pretrain.arrays import to_tensors
    from jobs.pretrain.config import parse_config
    from jobs.pretrain.data import feature_set_info, tower_inputs, with_recorded_vocabulary
    from jobs.pretrain.metrics import embed, pair_recalls
    from jobs.pretrain.step import Stepper

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    raw = {"store": str(store), "feature_set": "inputs", "modalities": TOWERS, "seed": seed,
           "optimizer": {"lr": 0.002, "weight_decay": 0.05}, "batch_size": 128,
           "warmup_steps": 10, "num_workers": 1, **over}  # fmt: skip
    fs = FeatureStore(str(store))
    info = feature_set_info(fs, "inputs", None)
    cfg = with_recorded_vocabulary(info, parse_config(raw))
    inputs = tower_inputs(info, cfg)
    table = fs.to_arrow(info.table, info.version)
    data = {
        s: to_tensors(table, inputs=inputs, split=s, include_views=False, labels=True)
        for s in ("train", "test")
    }
    train = data["train"]
    rows = len(train["label"])
    steps = rows // cfg.batch_size
    shapes = {c: info.shape(c) for c, _, _ in inputs.values()}
    stepper = Stepper(cfg, shapes, total_steps=cfg.epochs * steps, device=torch.device("cpu"))
    rng = np.random.default_rng(seed)
    for _ in range(cfg.epochs):
        order = rng.permutation(rows)
        for i in range(steps):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            stepper.train_step({k: torch.as_tensor(v[idx]) for k, v in train.items()})
    test = data["test"]
    stepper.model.eval()
    feats = {m: embed(stepper.model, m, test[f"x_{m}"]) for m in stepper.model.towers}
    present = {m: test[f"has_{m}"] for m in stepper.model.towers}
    scores = pair_recalls(feats, present, cfg.modality_pairs, labels=test["label"])
    return {
        "a->i": scores["audio->image/class_r@1"],
        "i->a": scores["image->audio/class_r@1"],
        "mean": scores["mean_class_r@1"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", type=Path, default=ROOT.parent / "shared/data/spoken-digits-dev"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--folds", default="jackson,yweweler,nicolas,theo")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    folds = args.folds.split(",")
    unknown = sorted({*configs} - set(CONFIGS)) + sorted({*folds} - set(SPEAKERS))
    if unknown:
        parser.error(f"unknown config or speaker: {', '.join(unknown)}")
    if not (args.corpus / "manifest.jsonl").is_file():
        parser.error(f"{args.corpus} has no manifest.jsonl (the spoken-digits-dev corpus)")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mmfp-bench-speakers-") as tmp:
        for fold in folds:
            store = build_fold(args.corpus, Path(tmp), fold)
            for name in configs:
                for seed in seeds:
                    t0 = time.perf_counter()
                    score = train_and_score(store, CONFIGS[name], seed)
                    results.setdefault((fold, name), []).append(score)
                    print(json.dumps({"fold": fold, "config": name, "seed": seed,
                                      "s": round(time.perf_counter() - t0), **score}),
                          flush=True)  # fmt: skip
    rows = []
    for name in configs:
        cells = []
        for fold in folds:
            mean = statistics.mean(r["mean"] for r in results[(fold, name)])
            cells.append(mean)
        rows.append((name, *cells, statistics.mean(cells)))
    print("\nclass-match recall@1 on the held-out speaker, mean of the six directions (chance 0.1)")
    print_table(("config", *folds, "mean"), rows, (12, *[10] * len(folds), 8))
    audio = {
        name: statistics.mean(
            (r["a->i"] + r["i->a"]) / 2 for fold in folds for r in results[(fold, name)]
        )
        for name in configs
    }
    for name in configs:
        print(f"{name}: audio<->image class-match recall@1 over the folds {audio[name]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
