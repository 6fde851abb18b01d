"""Tiny Hugging Face checkpoints built from configs (no network, < 1 s each): demos and tests.

Each ``tiny_*`` function saves a randomly initialised model (fixed seed) plus
the tokenizer / image processor / feature extractor a real checkpoint ships,
so the encoders load them by path exactly as they load a user's model.
"""

from __future__ import annotations

from pathlib import Path

from jobs.demo import corpus

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3
_LAYER = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def vocabulary() -> dict[str, int]:
    """Special tokens plus every word the demo corpus's captions use."""
    words = {
        w
        for template in corpus.TEMPLATES
        for w in template.replace("{", " ").replace("}", " ").replace(",", " ").split()
    }
    words |= set(corpus.CLASSES) | {c for c, _ in corpus.COLOURS}
    words |= set(corpus.BACKGROUNDS) | set(corpus.SIZES) | set(corpus.TONES)
    words |= {",", ":", ".", "photo", "sound"}
    return {t: i for i, t in enumerate([*SPECIAL, *sorted(words)])}


def write_tokenizer(path: Path, *, max_length: int = 64) -> Path:
    """A WordPiece tokenizer over ``vocabulary()``; v5's ``BertTokenizer`` takes the vocab
    as a dict (a ``vocab_file=`` argument is silently ignored)."""
    from transformers import BertTokenizer

    BertTokenizer(vocab=vocabulary(), model_max_length=max_length).save_pretrained(path)
    return Path(path)


def _seeded() -> None:
    import torch

    torch.manual_seed(0)


def tiny_bert(path: Path, *, hidden_size: int = 24) -> Path:
    from transformers import BertConfig, BertModel

    _seeded()
    config = BertConfig(
        vocab_size=len(vocabulary()), hidden_size=hidden_size, max_position_embeddings=64,
        pad_token_id=PAD_ID, **_LAYER,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    return write_tokenizer(path)


def tiny_vit(path: Path, *, pooler: bool = True, hidden_size: int = 16) -> Path:
    """ViT on 32x32 images; ``pooler=False`` saves a checkpoint without pooler weights
    (like a classification fine-tune), which ``AutoModel`` re-creates at random."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    _seeded()
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=hidden_size, **_LAYER)
    ViTModel(config, add_pooling_layer=pooler).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return Path(path)


def _clip_config(projection_dim: int):
    from transformers import CLIPConfig

    text = {
        "vocab_size": len(vocabulary()), "hidden_size": 16, "max_position_embeddings": 32,
        "bos_token_id": CLS_ID, "eos_token_id": SEP_ID, "pad_token_id": PAD_ID, **_LAYER,
    }  # fmt: skip
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, **_LAYER}
    # Sub-configs keep their default projection_dim (512) on purpose: only the top-level
    # value matches the weights, as the encoders must cope with.
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def tiny_clip(path: Path, *, projection_dim: int = 12) -> Path:
    """A full CLIPModel checkpoint (both towers), its image processor and tokenizer."""
    from transformers import CLIPImageProcessor, CLIPModel

    _seeded()
    CLIPModel(_clip_config(projection_dim)).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    processor.save_pretrained(path)
    return write_tokenizer(path, max_length=32)


def tiny_ast(path: Path) -> Path:
    """AST over 64 frames x 32 mel bins (0.64 s at 16 kHz)."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    _seeded()
    config = ASTConfig(
        hidden_size=16, max_length=64, num_mel_bins=32, patch_size=16,
        frequency_stride=10, time_stride=10, **_LAYER,
    )  # fmt: skip
    ASTModel(config).save_pretrained(path)
    ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(path)
    return Path(path)


def tiny_wav2vec2(path: Path) -> Path:
    """wav2vec2 with layer-norm features (so the extractor returns an attention mask)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    _seeded()
    config = Wav2Vec2Config(
        hidden_size=16, conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", vocab_size=8, **_LAYER,
    )  # fmt: skip
    Wav2Vec2Model(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(path)
    return Path(path)


def tiny_whisper(path: Path) -> Path:
    """Whisper whose encoder takes 1 s chunks (100 frames x 16 mel bins)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    _seeded()
    config = WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_mel_bins=16, max_source_positions=50, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    WhisperModel(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=160).save_pretrained(path)
    return Path(path)


def tiny_clap(path: Path, *, projection_dim: int = 8) -> Path:
    """CLAP (unfused HTSAT audio tower over 1 s, 16 mel bins) with its tokenizer."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    _seeded()
    text = {
        "vocab_size": len(vocabulary()), "hidden_size": 16, "max_position_embeddings": 40,
        "pad_token_id": PAD_ID, "bos_token_id": CLS_ID, "eos_token_id": SEP_ID, **_LAYER,
    }  # fmt: skip
    audio = {
        "spec_size": 64, "num_mel_bins": 16, "patch_embeds_hidden_size": 8, "depths": [1, 1],
        "num_attention_heads": [2, 2], "hidden_size": 16, "window_size": 4, "patch_size": 4,
        "patch_stride": (4, 4), "enable_fusion": False,
    }  # fmt: skip
    config = ClapConfig(text_config=text, audio_config=audio, projection_dim=projection_dim)
    ClapModel(config).save_pretrained(path)
    ClapFeatureExtractor(
        feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1,
        fft_window_size=400, frequency_max=8000, truncation="rand_trunc",
    ).save_pretrained(path)  # fmt: skip
    return write_tokenizer(path, max_length=32)
