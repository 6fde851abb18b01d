"""``mmfp demo``: make a small tri-modal corpus, write its spec, build it into a local store."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from features.store import FeatureStore
from jobs.demo.corpus import write_demo_corpus
from jobs.demo.preview import augment_preview
from jobs.demo.tiny_models import tiny_clip, write_tokenizer
from jobs.live import live_progress
from jobs.report import console, print_build, print_log_file
from jobs.runtime import new_job, verbose
from pipelines.build import BuildResult, build
from pipelines.errors import SpecError
from pipelines.spec import load_spec

MARKER = ".mmfp-demo"  # what lets --fresh delete a work directory: the demo made it

DEMO_SPEC = """\
# Written by `mmfp demo`. Paths are relative to this file.
name: demo
sources:
  - {kind: directory, name: photos, uri: data/photos, class_folders: true}
  - {kind: manifest, name: catalog, uri: data/catalog/manifest.jsonl}
  - {kind: webdataset, name: shards, uri: data/shards}
  # deliberately broken inputs: each one ends in the quarantine table with its reason
  - {kind: directory, name: broken, uri: data/broken}
  - {kind: manifest, name: broken-manifest, uri: data/broken/bad_manifest.jsonl}
split:
  seed: 0
  ratios: {train: 0.8, val: 0.1, test: 0.1}
label:
  # first source that has a label wins: the input's own label, then a caption rule
  sources:
    - {kind: folder}
    - {kind: manifest}
    - kind: rules
      keywords: {circle: [circle], square: [square], triangle: [triangle]}
  vocabulary: [circle, square, triangle, star, cross, ring, diamond, bars, dots, wave]
quality:
  # per-sample stats go to the `quality` table (`mmfp store stats quality`); a sample that
  # fails a filter moves to quarantine as Filtered:<name> (`mmfp filter` applies changes)
  filters:
    - {stat: audio_clip_ratio, max: 0.2}
    - {stat: image_blur, min: 5}
augment:
  views_per_sample: 2
  seed: 0
  image:
    - {name: Affine, params: {scale: [0.85, 1.15], rotate: [-15, 15], p: 0.8}}
    - {name: HorizontalFlip, params: {p: 0.5}}
    # no hue jitter: colour is part of what the captions say
    - name: ColorJitter
      params: {brightness: 0.3, contrast: 0.3, saturation: 0.2, hue: 0.0, p: 0.8}
    - {name: GaussNoise, params: {p: 0.3}}
  audio: {sample_rate: 16000, pitch_shift: [-2, 2], time_stretch: [0.9, 1.1], p: 0.7}
  text: {word_delete_p: 0.1, templates: ["{text}", "a picture of {text}"]}
encode:
  feature_sets:
    # model inputs, weight-free: what trainable towers read
    - name: inputs
      encoders:
        - {name: image_pixels, params: {size: 32}}
        - {name: audio_logmel, params: {n_mels: 32, frames: 50}}
        - {name: text_ids, model: models/tokenizer, params: {max_length: 16}}
    # a joint model by local path (here a tiny random CLIP built from a config; on a
    # cluster, a real checkpoint path or hub id and num_gpus per actor)
    - name: clip
      encoders:
        - {name: clip, model: models/tiny-clip, batch_size: 64}
store:
  uri: store
"""

# Contrastive pretraining on the demo's own feature set: trainable towers over the
# stored model inputs, text as the anchor (ImageBind style), 2 CPU workers.
DEMO_TRAIN = """\
# Written by `mmfp demo`. Paths are relative to this file.
name: demo
store: store
feature_set: inputs
modalities:
  text: {kind: transformer, input: text_ids, vocab_size: 128, width: 64, layers: 1, heads: 4,
         out_dim: 64}
  image: {kind: cnn, input: image_pixels, channels: [16, 32], out_dim: 64}
  audio: {kind: cnn, input: audio_logmel, channels: [16, 32], out_dim: 64}
pairs: {anchor: text}
loss: infonce
optimizer: {lr: 0.003, weight_decay: 0.05}
epochs: 10
batch_size: BATCH_SIZE
warmup_steps: 5
num_workers: 2
cpus_per_worker: 0.5
checkpoint_every_steps: 50
seed: 0
"""


def train_and_evaluate(workdir: Path) -> None:
    """Pretrain on the demo store (a rerun resumes the finished run) and print test recall."""
    from jobs.cli_train import print_eval_summary, print_train_summary
    from jobs.evaluate import evaluate
    from jobs.pretrain.config import load_config
    from jobs.pretrain.train import run_training

    store = FeatureStore(str(workdir / "store"))
    splits = store.to_arrow("features/inputs", columns=["split", "view"]).to_pylist()
    train_rows = sum(1 for r in splits if r["split"] == "train" and r["view"] == -1)
    # two workers need at least two full batches; small --n-per-class demos get smaller ones
    batch_size = max(4, min(64, train_rows // 4))
    config_path = workdir / "train.yaml"
    config_path.write_text(DEMO_TRAIN.replace("BATCH_SIZE", str(batch_size)))
    config = load_config(config_path)
    console.print("contrastive pretraining (Ray Train, 2 CPU workers) ...")
    result = run_training(config)
    print_train_summary(config.name, result)
    print_eval_summary(evaluate(result.checkpoint.path, split="test"))


def run_demo(
    workdir: Path,
    *,
    n_per_class: int = 20,
    fresh: bool = False,
    train: bool = True,
    address: str | None = None,
) -> BuildResult:
    if fresh and workdir.exists():
        if not _made_by_demo(workdir):
            raise SpecError(
                f"--fresh deletes the demo's work directory, but {workdir} was not made by "
                "`mmfp demo` (it has no .mmfp-demo marker): choose another --workdir"
            )
        shutil.rmtree(workdir)
    if workdir.exists() and any(workdir.iterdir()) and not _made_by_demo(workdir):
        raise SpecError(
            f"{workdir} already holds files not made by `mmfp demo`: choose another --workdir"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(
        "made by `mmfp demo`; `mmfp demo --fresh` may delete this folder\n"
    )
    data = workdir / "data"
    if data.exists():  # the corpus is deterministic: reuse it, so a rerun finds nothing new
        console.print(f"reusing the demo corpus under {data} (--fresh to start over)")
    else:
        corpus = write_demo_corpus(data, n_per_class=n_per_class)
        n_good = sum(corpus["counts"].values())
        console.print(
            f"demo corpus: {n_good} samples in 3 sources + {len(corpus['expected_errors'])} "
            f"broken inputs under {data}"
        )
    models = workdir / "models"
    if not (models / "tiny-clip").exists():
        with _quiet_transformers():  # its save bars and fallback notes are not the demo's
            tiny_clip(models / "tiny-clip")
            write_tokenizer(models / "tokenizer")
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(DEMO_SPEC)
    spec = load_spec(spec_path)
    # like `mmfp build`: the small build stays in this process on a private local Ray,
    # and Ray (its log lines in the run's log file) starts for training
    job = new_job(address)
    with live_progress() as progress:
        result = build(spec, run_id=job.run_id, execution=job.execution(progress))
    store = FeatureStore(spec.store.uri, storage_options=spec.store.storage_options)
    print_build(result, store)
    preview = augment_preview(store, workdir / "augmentations.png")
    if preview:
        console.print(f"augmentation preview: {preview}")
    if train:
        job.start_ray()
        train_and_evaluate(workdir)
    print_log_file(job.log_file)
    console.print(
        f"next: mmfp store ls --store {store.uri}   |   "
        f"mmfp store describe samples --store {store.uri}"
    )
    return result


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    if verbose():
        yield
        return
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _made_by_demo(workdir: Path) -> bool:
    """The demo's marker is there, or the spec it writes (work directories made before
    the marker existed)."""
    spec = workdir / "spec.yaml"
    written = spec.is_file() and spec.read_text(errors="replace").startswith(DEMO_SPEC[:30])
    return (workdir / MARKER).is_file() or written
