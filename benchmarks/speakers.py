"""Unseen-speaker benchmark (issue 14): contrastive pretraining on spoken-digits-dev, one
speaker held out per fold.

    python benchmarks/speakers.py [--corpus ../shared/data/spoken-digits-dev]
                                  [--configs clip,clip-long,label-free,supervised]
                                  [--folds jackson,lucas,nicolas,theo,yweweler] [--seeds 0]
                                  [--head]

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

With ``--head``, each trained model's towers are exported and a late-fusion classifier
head (``mmfp train --head classify``'s ``train_head``) is trained on them with the
validation speaker for selection: accuracy on the held-out speaker per modality, fused
over audio + image, and fused over all three. Each fold also reports the supervised
reference of the issue: logistic regression on MFCC statistics (20 coefficients and
their deltas, mean and std over four segments), trained on the train speakers and on
train + validation speakers.
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
# the x-vector-style speech tower (MFCCs + deltas over voiced frames, mean + std pooling)
TDNN = {**TOWERS, "audio": {"kind": "tdnn", "input": "audio_logmel", "out_dim": 64}}
CONFIGS: dict[str, dict[str, Any]] = {
    # CLIP's loss, as the user ran it: 40 epochs, and longer
    "clip": {"epochs": 40, "loss": {"duplicates": "negative"}},
    "clip-long": {"epochs": 120, "loss": {"duplicates": "negative"}},
    # no labels: identical captions are positives, SpecAugment + shift + gain on audio
    "label-free": {"epochs": 120, "augment": {"audio": {}}},
    # no labels: the same, and rows sharing a caption are positives in every pair
    "label-free-any": {"epochs": 120, "augment": {"audio": {}}, "loss": {"duplicates": "any"}},
    # labels used: the same plus a supervised-contrastive term
    "supervised": {"epochs": 120, "augment": {"audio": {}}, "loss": {"supervised_weight": 0.5}},
    # the last two with the TDNN speech tower instead of the 2-D CNN
    "label-free-any-tdnn": {"epochs": 120, "augment": {"audio": {}}, "loss": {"duplicates": "any"},
                            "modalities": TDNN},
    "supervised-tdnn": {"epochs": 120, "augment": {"audio": {}}, "loss": {"supervised_weight": 0.5},
                        "modalities": TDNN},
    # and a vocal tract length warp of the mel axis by up to 10%
    "supervised-tdnn-warp": {"epochs": 120, "augment": {"audio": {"warp": 0.1}},
                             "loss": {"supervised_weight": 0.5}, "modalities": TDNN},
    "label-free-any-tdnn-warp": {"epochs": 120, "augment": {"audio": {"warp": 0.1}},
                                 "loss": {"duplicates": "any"}, "modalities": TDNN},
}  # fmt: skip


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


def mfcc_reference(store: Path) -> dict[str, float]:
    """The issue's supervised reference on this fold: test accuracy of a logistic regression
    on MFCC statistics, trained on the train speakers, and on train + validation."""
    import io

    import librosa
    import numpy as np
    import soundfile
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from features.store import FeatureStore

    rows = FeatureStore(str(store)).to_arrow("samples", columns=["split", "label", "audio"])
    features, splits, labels = [], [], []
    for row in rows.to_pylist():
        if row["audio"] is None or row["label"] is None:
            continue
        wave, rate = soundfile.read(io.BytesIO(row["audio"]), dtype="float32", always_2d=True)
        mfcc = librosa.feature.mfcc(y=wave.mean(1), sr=rate, n_mfcc=20, n_fft=512, hop_length=128)
        both = np.concatenate([mfcc, librosa.feature.delta(mfcc, width=3)])
        parts = np.array_split(both, 4, axis=1)
        features.append(np.concatenate([np.r_[p.mean(1), p.std(1)] for p in parts]))
        splits.append(row["split"])
        labels.append(row["label"])
    x, split, y = np.array(features), np.array(splits), np.array(labels)
    out = {}
    for name, fit_on in (("mfcc", ("train",)), ("mfcc+val", ("train", "val"))):
        chosen = np.isin(split, fit_on)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        model.fit(x[chosen], y[chosen])
        test = split == "test"
        out[name] = float((model.predict(x[test]) == y[test]).mean())
    return out


def head_scores(store: Path, model: Any, cfg: Any, info: Any, seed: int) -> dict[str, float]:
    """Export the towers, train late-fusion heads on them (all towers; audio + image) and
    return their accuracies on the held-out speaker."""
    from jobs.head.config import parse_head_config
    from jobs.head.fit import train_head
    from jobs.pretrain.model import export_towers

    with tempfile.TemporaryDirectory(prefix="mmfp-bench-head-") as tmp:
        shapes = {t.input: info.shape(t.input) for t in cfg.modalities.values()}
        meta = {"config": cfg.public_dict(), "shapes": shapes, "feature_set": info.name,
                "version": info.version, "encoders": info.encoders()}  # fmt: skip
        export_towers(model, Path(tmp) / "run" / "export", meta)
        out = {}
        for name, modalities in (("all", None), ("ai", ["audio", "image"])):
            head = parse_head_config({
                "name": f"head-{name}", "store": str(store), "storage_path": tmp, "seed": seed,
                "inputs": [{"model": str(Path(tmp) / "run"), "modalities": modalities}],
                "fusion": "late", "epochs": 100,
            })  # fmt: skip
            test = train_head(head).accuracy["test"]
            if name == "all":
                out |= {f"head_{m}": test[m] for m in ("audio", "image", "text")}
                out["head_fused"] = test["fused"]
            else:
                out["head_fused_ai"] = test["fused"]
        return out


def train_and_score(
    store: Path, over: dict[str, Any], seed: int, *, head: bool = False
) -> dict[str, float]:
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
    out = {
        "a->i": scores["audio->image/class_r@1"],
        "i->a": scores["image->audio/class_r@1"],
        "mean": scores["mean_class_r@1"],
    }
    return out | (head_scores(store, stepper.model, cfg, info, seed) if head else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", type=Path, default=ROOT.parent / "shared/data/spoken-digits-dev"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--folds", default=",".join(SPEAKERS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--head", action="store_true", help="also train fusion heads")
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
            reference = mfcc_reference(store)
            print(json.dumps({"fold": fold, "config": "reference", **reference}), flush=True)
            for name in configs:
                for seed in seeds:
                    t0 = time.perf_counter()
                    score = train_and_score(store, CONFIGS[name], seed, head=args.head)
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
    if args.head:
        keys = ("head_audio", "head_image", "head_fused_ai", "head_fused")
        print("\nlate-fusion head accuracy on the held-out speaker, mean (min-max) over seeds")
        for name in configs:
            for fold in folds:
                cells = [_spread([r[k] for r in results[(fold, name)]]) for k in keys]
                print(
                    f"{name:12s} {fold:10s} "
                    + "  ".join(f"{k[5:]} {c}" for k, c in zip(keys, cells, strict=True))
                )
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    sys.exit(main())
