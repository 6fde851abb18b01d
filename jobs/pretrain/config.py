"""TrainConfig: the YAML file behind ``mmfp train``, validated before any Ray work starts.

One tower per modality; the modality keys are the embedding spaces that the
contrastive loss binds together. Relative local paths (store, storage_path,
HF model paths) resolve against the config file's directory.
"""

from __future__ import annotations

import hashlib
import json
from itertools import combinations
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.storage import join_uri, normalize_uri, redact
from pipelines.spec import read_yaml_mapping, validated

Modality = Literal["text", "image", "audio"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectionTower(_Model):
    """An MLP head over a frozen embedding column (LiT / ImageBind-style binding)."""

    kind: Literal["projection"]
    input: str  # an embedding column of the feature set, e.g. image_emb
    hidden: int = Field(256, ge=0)  # 0: a single linear layer
    out_dim: int = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # > 0 makes resumed runs drift from uninterrupted ones

    @field_validator("input")
    @classmethod
    def _embedding_column(cls, value: str) -> str:
        if not value.endswith("_emb"):
            raise ValueError(f"a projection tower reads an embedding column (*_emb), not {value!r}")
        return value


class CnnTower(_Model):
    """A small strided CNN over stored pixels (3xSxS) or a log-mel spectrogram (mels x frames)."""

    kind: Literal["cnn"]
    input: Literal["image_pixels", "audio_logmel"]
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    out_dim: int = Field(128, gt=0)
    # sample: standardise each input as a whole; cmvn (log-mels): each mel bin over the
    # utterance's non-silent frames (per-utterance cepstral mean and variance
    # normalisation), which takes out a microphone's or a voice's spectral tilt
    normalize: Literal["sample", "cmvn"] = "sample"

    @model_validator(mode="after")
    def _cmvn_for_logmel(self) -> CnnTower:
        if self.normalize == "cmvn" and self.input != "audio_logmel":
            raise ValueError("normalize: cmvn is for audio_logmel inputs")
        return self


class TdnnTower(_Model):
    """A small-footprint speech tower over a log-mel (x-vector style): MFCCs (a DCT of the
    log-mel) and their deltas, standardised over the utterance's voiced frames, dilated
    1-D convolutions over time, then mean + std pooling over the voiced frames only, so
    how long the silence around a word lasts changes nothing. On unseen speakers it beats
    the 2-D CNN by a wide margin (BENCHMARKS.md, "Unseen speakers")."""

    kind: Literal["tdnn"]
    input: Literal["audio_logmel"]
    n_mfcc: int | None = Field(20, gt=0)  # None: the log-mel bins themselves, no DCT
    deltas: bool = True  # append first-order deltas (their change over time)
    channels: int = Field(128, gt=0)
    out_dim: int = Field(128, gt=0)


class AudioAugment(_Model):
    """Training-time log-mel augmentation (SpecAugment + shift + gain)."""

    time_masks: int = Field(2, ge=0)
    time_width: int = Field(10, ge=0)  # frames, at most, per mask
    freq_masks: int = Field(2, ge=0)
    freq_width: int = Field(6, ge=0)  # mel bins, at most, per mask
    shift: int = Field(10, ge=0)  # frames, at most, the utterance moves right
    gain_db: float = Field(6.0, ge=0)  # uniform in +-gain_db
    # vocal tract length perturbation: the mel axis stretched by a factor in 1 +- warp from
    # its lowest bin (0.1 is usual), so a voice sounds longer or shorter; 0: off
    warp: float = Field(0.0, ge=0, lt=1)


class ImageAugment(_Model):
    """Training-time pixel augmentation."""

    shift: int = Field(2, ge=0)  # pixels, at most, each way
    rotate: float = Field(0.0, ge=0, le=180)  # degrees, at most, each way
    scale: float = Field(0.0, ge=0, lt=1)  # zoom in 1 +- scale


class TextAugment(_Model):
    """Training-time token-id augmentation."""

    drop: float = Field(0.1, ge=0, lt=1)  # each token deleted with this chance (ids close up)


class TrainAugment(_Model):
    """Augment training batches on the device (never validation or evaluation)."""

    audio: AudioAugment | None = None
    image: ImageAugment | None = None
    text: TextAugment | None = None


class TransformerTower(_Model):
    """A from-scratch text transformer over stored token ids, mean-pooled over non-pad tokens."""

    kind: Literal["transformer"]
    input: Literal["text_ids"] = "text_ids"
    # None: the vocabulary the feature set records for its input (text_ids writes it)
    vocab_size: int | None = Field(None, gt=0)
    width: int = Field(128, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    pad_id: int | None = None  # None: the pad id the feature set records (else 0)
    dropout: float = Field(0.0, ge=0, lt=1)
    out_dim: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerTower:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        return self


class HfTower(_Model):
    """A Hugging Face model built from a config dict (offline) or a local directory."""

    kind: Literal["hf"]
    input: Literal["text_ids", "image_pixels", "audio_logmel"]
    # AutoConfig.for_model(**config): needs `model_type` (bert, vit, audio-spectrogram-transformer)
    config: dict[str, Any] | None = None
    path: str | None = None  # local directory with config.json + model.safetensors
    pad_id: int | None = None  # text: attention mask is ids != pad_id; None: as recorded
    out_dim: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _config_or_path(self) -> HfTower:
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of `config` (a dict with model_type) or `path`")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`config` needs `model_type` (e.g. bert, vit)")
        return self


Tower = Annotated[
    ProjectionTower | CnnTower | TdnnTower | TransformerTower | HfTower,
    Field(discriminator="kind"),
]


class AnchorPairs(_Model):
    """Pair every modality with one anchor only (ImageBind binds everything to images)."""

    anchor: Modality


class LossConfig(_Model):
    kind: Literal["infonce", "siglip"] = "infonce"
    # Initial temperature; None: 0.07 for InfoNCE (CLIP), 0.1 for SigLIP (scale 10).
    init_temperature: float | None = Field(None, gt=0)
    max_logit_scale: float = Field(100.0, gt=0)  # the learnable scale is clamped to this
    init_bias: float = -10.0  # SigLIP only: starts every pair as "probably negative"
    # positive: rows with an identical input (caption, ids, image) in either modality of a
    # pair are positives of each other, not negatives (multi-positive InfoNCE / SigLIP);
    # negative: every other row is a negative, as CLIP's loss has it;
    # any: rows sharing an identical input in any modality (the same caption) are the same
    # thing, positives in every pair (the audio of one and the image of the other too)
    duplicates: Literal["positive", "any", "negative"] = "positive"
    # > 0: add this weight of a supervised term where same-label rows are positives (needs
    # the feature set's `label` column; rows without a label only count as themselves)
    supervised_weight: float = Field(0.0, ge=0)


class OptimizerConfig(_Model):
    """AdamW; weight decay skips biases, norms and the logit scale, as CLIP does."""

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)


class FaultInjection(_Model):
    """Test hook: fail once after a step, so restart and resume paths can be tested.

    Acts only while ``marker`` does not exist (it is created just before the
    failure), so the retried or rerun attempt trains normally. ``raise`` makes the
    run fail with an exception; ``exit`` kills the worker process (``os._exit``).
    """

    after_step: int = Field(gt=0)
    mode: Literal["raise", "exit"] = "raise"
    rank: int = Field(0, ge=0)
    marker: str


RECALL_KS = (1, 5, 10)  # recall@k that validation and evaluation report


class SelectConfig(_Model):
    """Keep the best checkpoint by a validation metric (``TrainConfig`` checks the name
    against the metrics its validation reports); optionally stop early."""

    # a validation metric: val/mean_r@1 (instance recall@1 averaged over directions),
    # val/mean_class_r@1 (is the nearest item of the other modality the same label?),
    # or one direction, e.g. val/image->audio/r@1, val/image->audio/class_r@1
    metric: str = "val/mean_r@1"
    mode: Literal["max", "min"] = "max"
    patience: int | None = Field(None, gt=0)  # stop after this many validations without gain
    min_delta: float = Field(0.0, ge=0)  # a gain smaller than this does not count


class TrainConfig(_Model):
    """A contrastive pretraining run over one feature set of a store."""

    name: str = "pretrain"  # run name: a rerun with the same name resumes its latest checkpoint
    store: str = "mmfp-store"  # local path (relative to the config file) or s3://bucket/prefix
    storage_options: dict[str, str] = Field(default_factory=dict)  # never saved in checkpoints
    feature_set: str  # reads the table features/<feature_set>
    version: int | None = None  # None: latest at start (a resumed run keeps its pinned version)
    modalities: dict[Modality, Tower] = Field(min_length=2)
    pairs: Literal["all"] | AnchorPairs = "all"
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(256, gt=1)  # per worker; negatives come from all workers' batches
    warmup_steps: int = Field(0, ge=0)  # linear warmup, then cosine decay to 0
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None: no clipping
    amp: Literal["bf16", "fp16", "off"] = "bf16"  # autocast on CUDA only; CPU runs float32
    include_views: bool = False  # also train on augmented views (view >= 0)
    # leave out samples `mmfp dedup` marked as near duplicates (their kept twin stays)
    exclude_duplicates: bool = False
    shuffle_buffer: int = Field(1024, ge=0)  # rows in each worker's seeded local shuffle
    prefetch_batches: int = Field(2, ge=0)
    # per worker: keep the shard's rows in memory after the first epoch and draw later
    # epochs from them, when they fit (jobs.pretrain.batches); 0: stream every epoch
    cache_mb: int = Field(1024, ge=0)
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)  # leave CPUs free for Ray Data's read tasks
    checkpoint_every_steps: int | None = Field(None, gt=0)  # plus one checkpoint per epoch
    keep_checkpoints: int | None = Field(3, gt=0)  # None: keep all
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the latest checkpoint
    storage_path: str | None = None  # None: <store>/_train
    seed: int = 0
    val_max_rows: int = Field(2048, ge=0)  # val recall after each epoch on this many rows; 0: off
    val_every_steps: int | None = Field(None, gt=0)  # also validate (and checkpoint) this often
    select: SelectConfig | None = None  # keep the best checkpoint by a val metric, stop early
    augment: TrainAugment | None = None  # on training batches only
    fault: FaultInjection | None = None  # test hook, see FaultInjection

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        for modality, tower in self.modalities.items():
            if not tower.input.startswith(f"{modality}_"):
                raise ValueError(
                    f"modalities.{modality}.input {tower.input!r} is not a {modality} column "
                    f"(expected {modality}_emb, {modality}_pixels, {modality}_logmel or "
                    f"{modality}_ids)"
                )
        dims = {m: t.out_dim for m, t in self.modalities.items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"every tower needs the same out_dim (one shared space), got {dims}")
        if (self.select or self.val_every_steps) and not self.val_max_rows:
            raise ValueError("select and val_every_steps need validation: val_max_rows > 0")
        if self.select and self.select.metric not in self.val_metrics():
            raise ValueError(
                f"select.metric {self.select.metric!r} is not a validation metric of this run; "
                f"known: {', '.join(self.val_metrics())}"
            )
        if isinstance(self.pairs, AnchorPairs) and self.pairs.anchor not in self.modalities:
            raise ValueError(
                f"pairs.anchor {self.pairs.anchor!r} has no tower; modalities: "
                f"{', '.join(self.modalities)}"
            )
        return self

    @property
    def modality_pairs(self) -> list[tuple[str, str]]:
        """The (a, b) modality pairs the loss contrasts, in a fixed order."""
        names = sorted(self.modalities)
        if self.pairs == "all":
            return list(combinations(names, 2))
        anchor = self.pairs.anchor
        return [(anchor, m) for m in names if m != anchor]

    def val_metrics(self) -> list[str]:
        """The names validation reports (``jobs.pretrain.metrics.pair_recalls``)."""
        names = ["val/mean_r@1", "val/mean_class_r@1"]
        for a, b in self.modality_pairs:
            for src, dst in ((a, b), (b, a)):
                names += [f"val/{src}->{dst}/r@{k}" for k in RECALL_KS]
                names.append(f"val/{src}->{dst}/class_r@1")
        return names

    @property
    def embed_dim(self) -> int:
        return next(iter(self.modalities.values())).out_dim

    @property
    def table_name(self) -> str:
        return f"features/{self.feature_set}"

    @property
    def run_storage_path(self) -> str:
        return self.storage_path or join_uri(self.store, "_train")

    def resolved(self, base_dir: Path) -> TrainConfig:
        """A copy with relative local paths made absolute against ``base_dir``."""
        data = self.model_dump()
        data["store"] = normalize_uri(data["store"], base_dir=str(base_dir))
        if data["storage_path"]:
            data["storage_path"] = normalize_uri(data["storage_path"], base_dir=str(base_dir))
        for tower in data["modalities"].values():
            if tower.get("path"):
                tower["path"] = normalize_uri(tower["path"], base_dir=str(base_dir))
        return TrainConfig.model_validate(data)

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able data with secrets redacted: what checkpoints record."""
        data = self.model_dump(mode="json")
        data["storage_options"] = redact(data["storage_options"])
        return data

    def config_hash(self) -> str:
        canonical = json.dumps(self.public_dict(), sort_keys=True).encode()
        return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def parse_config(raw: dict[str, Any], origin: str = "<dict>") -> TrainConfig:
    """Validate a config mapping; ``SpecError`` names every bad field."""
    return validated(TrainConfig, raw, origin, "train config")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a train config file; relative paths resolve next to it."""
    path = Path(path)
    expected = "`feature_set:` and `modalities:`"
    raw = read_yaml_mapping(path, what="train config", expected=expected)
    return parse_config(raw, origin=str(path)).resolved(path.resolve().parent)
