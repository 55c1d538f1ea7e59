"""SmolVLM2 (and Idefics3-layout SmolVLM) Hugging Face checkpoint -> two GGUF files for llama.cpp.

Writes what llama.cpp's own converter (convert_hf_to_gguf.py: LlamaModel for the text model,
SmolVLMModel for the vision projector) writes for the same checkpoint:

- `{Name}-{QUANT}.gguf`: arch `llama`, Q/K rows permuted the way llama.cpp's rope expects,
  the SmolLM2 byte-level BPE vocabulary (`gpt2` model, `smollm` pre-tokenizer) padded to
  vocab_size with [PAD<id>], special token ids and chat template as llama.cpp derives them.
  F16 is written directly; Q8_0 / Q4_K_M / Q5_K_M go through llama.cpp's quantizer from an
  F16 intermediate (exactly `convert_hf_to_gguf.py --outtype f16` + `llama-quantize`).
- `mmproj-{Name}-{MMPROJ_QUANT}.gguf`: arch `clip`, projector `idefics3`, F16 or Q8_0 weights,
  embeddings, norms and biases F32.

Run as a script: python scripts/convert/smolvlm2.py CHECKPOINT --out DIR --quant Q8_0
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script from a source tree (sys.path[0] is this folder)
    import _script

    _script.make_vlmcli_convert_importable()

import gguf

from vlmcli.convert.checkpoint import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    architecture,
    checkpoint_folder,
    read_bpe_vocab,
    read_chat_template,
    read_config,
    read_json,
    read_preprocessor_config,
)
from vlmcli.convert.gguf_out import (
    DIRECT_TYPES,
    FILE_TYPES,
    PlannedTensor,
    QType,
    declare_tensors,
    weight_type,
    write_gguf,
)
from vlmcli.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, LazyTensor, load_safetensors
from vlmcli.errors import ModelError, VlmError
from vlmcli.gguf.layout import GgufTensor
from vlmcli.gguf.smolvlm2_layout import Idefics3Dims, LlamaDims, idefics3_tensors, llama_tensors

ARCHITECTURES = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
LM_QUANTS = ("F16", "Q8_0", "Q4_K_M", "Q5_K_M")
MMPROJ_QUANTS = ("F16", "Q8_0")
TOKENIZER_PRE = "smollm"  # the pre-tokenizer llama.cpp's converter identifies for SmolLM2's tokenizer

# HF tensors llama.cpp's converter drops without complaint.
_IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_TEXT_PREFIXES = ("model.text_model.", "model.language_model.")
_VISION_PREFIXES = ("model.vision_model.", "model.connector.")
LM_HEAD = "lm_head.weight"

Progress = Callable[[int, int, str], None]


@dataclass
class ConvertedVlm:
    model: Path
    mmproj: Path


@dataclass
class TextHparams:
    vocab_size: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool


@dataclass
class VisionHparams:
    hidden: int
    ffn: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    channels: int
    layer_norm_eps: float
    scale_factor: int
    projection_dim: int  # = text hidden size
    preproc_image_size: int
    image_mean: list[float]
    image_std: list[float]


def _check_quant(quant: str, valid: tuple[str, ...], what: str) -> str:
    q = quant.upper()
    if q not in valid:
        raise VlmError(f"unknown {what} quantization {quant!r}; valid: {', '.join(valid)}")
    return q


def _int(section: dict[str, Any], key: str, default: int | None, config_path: Path) -> int:
    value = section.get(key, default)
    if value is None:
        raise ModelError(f"config.json is missing {key}", config_path)
    if not isinstance(value, (int, float)) or int(value) != value or int(value) <= 0:
        raise ModelError(f"config.json has a bad {key}: {value!r}", config_path)
    return int(value)


def text_hparams(config: dict[str, Any], config_path: Path) -> TextHparams:
    """The text model's hyperparameters, with transformers' LlamaConfig defaults for missing keys
    (num_attention_heads 32 is also the default llama.cpp's converter applies for SmolVLM2)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ModelError("config.json has no text_config", config_path)
    hidden = _int(text, "hidden_size", 4096, config_path)
    heads = _int(text, "num_attention_heads", 32, config_path)
    kv_heads = _int(text, "num_key_value_heads", heads, config_path)
    head_dim = _int(text, "head_dim", hidden // heads if hidden % heads == 0 else None, config_path)
    if heads % kv_heads != 0:
        raise ModelError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}", config_path
        )
    # transformers 4.x keeps rope_theta in text_config; newer versions nest it in rope_parameters.
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = text.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
    tie = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return TextHparams(
        vocab_size=_int(text, "vocab_size", 32000, config_path),
        hidden=hidden,
        ffn=_int(text, "intermediate_size", 11008, config_path),
        layers=_int(text, "num_hidden_layers", 32, config_path),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=_int(text, "max_position_embeddings", 2048, config_path),
        rope_theta=float(theta if theta is not None else 10000.0),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(tie),
    )


def vision_hparams(
    config: dict[str, Any], preprocessor: dict[str, Any], text: TextHparams, config_path: Path
) -> VisionHparams:
    """The vision tower's hyperparameters; transformers' SmolVLMVisionConfig defaults fill missing
    keys (hidden 1152, heads 16, ffn 3072, 12 layers, image 224, patch 32), as llama.cpp's converter does."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise ModelError("config.json has no vision_config", config_path)
    image_size = _int(vision, "image_size", 224, config_path)
    patch = _int(vision, "patch_size", 32, config_path)
    scale = _int(config, "scale_factor", 2, config_path)
    hidden = _int(vision, "hidden_size", 1152, config_path)
    heads = _int(vision, "num_attention_heads", 16, config_path)
    if image_size % patch != 0 or (image_size // patch) % scale != 0:
        raise ModelError(
            f"image_size {image_size} / patch_size {patch} is not a multiple of scale_factor {scale}", config_path
        )
    if hidden % heads != 0:
        raise ModelError(f"vision hidden_size {hidden} is not a multiple of num_attention_heads {heads}", config_path)
    size = preprocessor.get("size")
    longest = size.get("longest_edge") if isinstance(size, dict) else None
    # SmolVLMImageProcessor's defaults (IMAGENET_STANDARD_MEAN/STD) when the file has none.
    mean = preprocessor.get("image_mean", [0.5, 0.5, 0.5])
    std = preprocessor.get("image_std", [0.5, 0.5, 0.5])
    return VisionHparams(
        hidden=hidden,
        ffn=_int(vision, "intermediate_size", 3072, config_path),
        layers=_int(vision, "num_hidden_layers", 12, config_path),
        heads=heads,
        image_size=image_size,
        patch_size=patch,
        channels=_int(vision, "num_channels", 3, config_path),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        scale_factor=scale,
        projection_dim=text.hidden,
        preproc_image_size=int(longest) if isinstance(longest, (int, float)) else image_size,
        image_mean=[float(x) for x in mean],
        image_std=[float(x) for x in std],
    )


def text_layout(h: TextHparams) -> list[GgufTensor]:
    """The language model's GGUF tensors (vlmcli.gguf.smolvlm2_layout)."""
    dims = LlamaDims(
        n_embd=h.hidden,
        n_vocab=h.vocab_size,
        n_layer=h.layers,
        heads=[h.heads] * h.layers,
        kv_heads=[h.kv_heads] * h.layers,
        ffn=[h.ffn] * h.layers,
        head_k=h.head_dim,
        head_v=h.head_dim,
    )
    return list(llama_tensors(dims))


def vision_layout(v: VisionHparams) -> list[GgufTensor]:
    """The projector's GGUF tensors (vlmcli.gguf.smolvlm2_layout)."""
    dims = Idefics3Dims(
        width=v.hidden,
        ffn=v.ffn,
        layers=v.layers,
        image_size=v.image_size,
        patch_size=v.patch_size,
        scale_factor=v.scale_factor,
        projection_dim=v.projection_dim,
        channels=v.channels,
    )
    return list(idefics3_tensors(dims))


def expected_text_tensors(h: TextHparams) -> dict[str, tuple[int, ...]]:
    """HF text-model tensor names (without the model.text_model. prefix) -> shapes; lm_head apart."""
    return {s.source: s.hf_shape for s in text_layout(h) if s.source is not None and s.source != LM_HEAD}


def expected_vision_tensors(v: VisionHparams) -> dict[str, tuple[int, ...]]:
    """HF vision tower + connector tensor names -> shapes."""
    return {s.source: s.hf_shape for s in vision_layout(v) if s.source is not None}


def permute_for_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half layout to llama.cpp's interleaved rope pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _weights_file(folder: Path) -> Path:
    index = folder / INDEX_FILE
    return index if index.is_file() else folder / SINGLE_FILE


class _Checkpoint:
    """A SmolVLM2 checkpoint folder: config, hyperparameters, lazily loaded tensors (validated)."""

    def __init__(self, checkpoint_dir: str | os.PathLike[str]):
        self.folder = checkpoint_folder(checkpoint_dir)
        self.config_path = self.folder / "config.json"
        self.config = read_config(self.folder)
        arch = architecture(self.config, self.config_path)
        if arch not in ARCHITECTURES:
            raise ModelError(
                f"architecture {arch} is not SmolVLM2 (expected {' or '.join(ARCHITECTURES)})", self.config_path
            )
        for required in (TOKENIZER_FILE,):
            if not (self.folder / required).is_file():
                raise ModelError(f"missing {required} in the checkpoint folder", self.folder / required)
        self.preprocessor = read_preprocessor_config(self.folder)
        self.text = text_hparams(self.config, self.config_path)
        self.vision = vision_hparams(self.config, self.preprocessor, self.text, self.config_path)
        self.tensors = load_safetensors(self.folder)
        self._split_and_validate()

    def _split_and_validate(self) -> None:
        weights_file = _weights_file(self.folder)
        self.text_tensors: dict[str, LazyTensor] = {}  # keyed by name without the text prefix
        self.vision_tensors: dict[str, LazyTensor] = {}
        self.lm_head: LazyTensor | None = None
        for name, tensor in self.tensors.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == LM_HEAD:
                self.lm_head = tensor
            elif name.startswith(_TEXT_PREFIXES):
                self.text_tensors[name.split(".", 2)[2]] = tensor
            elif name.startswith(_VISION_PREFIXES):
                self.vision_tensors[name] = tensor
            else:
                raise ModelError(f"unexpected tensor {name} (not a SmolVLM2 checkpoint?)", weights_file)

        def check(found: dict[str, LazyTensor], expected: dict[str, tuple[int, ...]], prefix: str) -> None:
            for name, shape in expected.items():
                tensor = found.get(name)
                if tensor is None:
                    raise ModelError(f"missing tensor {prefix}{name}", weights_file)
                if tensor.shape != shape:
                    raise ModelError(
                        f"tensor {prefix}{name} has shape {list(tensor.shape)}, config.json implies {list(shape)}",
                        weights_file,
                    )
                if tensor.dtype not in ("F32", "F16", "BF16", "F64"):
                    raise ModelError(
                        f"tensor {prefix}{name} has dtype {tensor.dtype}, expected floating point", weights_file
                    )
            extra = sorted(set(found) - set(expected))
            if extra:
                raise ModelError(
                    f"unexpected tensor {prefix}{extra[0]} (config.json does not account for it)", weights_file
                )

        check(self.text_tensors, expected_text_tensors(self.text), "model.text_model.")
        check(self.vision_tensors, expected_vision_tensors(self.vision), "")
        if self.lm_head is None and not self.text.tie_embeddings:
            raise ModelError(f"missing tensor {LM_HEAD}", weights_file)
        if self.lm_head is not None:
            head = {s.source: s.hf_shape for s in text_layout(self.text) if s.source == LM_HEAD}
            check({LM_HEAD: self.lm_head}, head, "")

    @property
    def name(self) -> str:
        return self.folder.resolve().name


# ----------------------------------------------------------------------------- planning


def _float_loader(
    tensor: LazyTensor, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        data = tensor.load().astype(np.float32, copy=False)
        return transform(data) if transform is not None else data

    return load


def plan_text_tensors(ckpt: _Checkpoint, wanted: QType) -> list[PlannedTensor]:
    """The LM's GGUF tensors in llama.cpp's naming, types as its converter picks them."""
    h = ckpt.text
    names = {s.source: s.name for s in text_layout(h)}
    items = sorted(ckpt.text_tensors.items())
    if ckpt.lm_head is not None:
        items.append((LM_HEAD, ckpt.lm_head))
    planned: list[PlannedTensor] = []
    for hf_name, tensor in items:
        new_name = names.get(hf_name)
        if new_name is None:
            raise ModelError(f"cannot map tensor {hf_name} to a llama.cpp name", _weights_file(ckpt.folder))
        transform = None
        if hf_name.endswith("q_proj.weight"):
            transform = functools.partial(permute_for_rope, n_head=h.heads)
        elif hf_name.endswith("k_proj.weight"):
            transform = functools.partial(permute_for_rope, n_head=h.kv_heads)
        shape = tuple(tensor.shape)
        # Norms and 1-D tensors stay F32 (llama.cpp's kernels expect it).
        qtype = QType.F32 if len(shape) <= 1 or new_name.endswith("_norm.weight") else weight_type(shape, wanted)
        planned.append(PlannedTensor(new_name, shape, qtype, _float_loader(tensor, transform)))
    return planned


def plan_vision_tensors(ckpt: _Checkpoint, wanted: QType) -> list[PlannedTensor]:
    """The mmproj's GGUF tensors: v.*, mm.model.fc; embeddings, norms and biases F32."""
    names = {s.source: s.name for s in vision_layout(ckpt.vision)}
    planned: list[PlannedTensor] = []
    for hf_name, tensor in sorted(ckpt.vision_tensors.items()):
        new_name = names.get(hf_name)
        if new_name is None:
            raise ModelError(f"cannot map tensor {hf_name} to a llama.cpp name", _weights_file(ckpt.folder))
        shape = tuple(tensor.shape)
        if ".embeddings." in hf_name or len(shape) <= 1 or not new_name.endswith(".weight"):
            qtype = QType.F32
        else:
            qtype = weight_type(shape, wanted)
        planned.append(PlannedTensor(new_name, shape, qtype, _float_loader(tensor)))
    return planned


# ----------------------------------------------------------------------------- metadata


def _add_general_metadata(writer: gguf.GGUFWriter, ckpt: _Checkpoint, gguf_type: str) -> None:
    """general.* as llama.cpp's converter fills it (model card, config, folder name heuristics)."""
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, ckpt.folder, None, total)
    if not metadata.name:
        metadata.name = ckpt.name
    if gguf_type == gguf.GGUFType.MODEL and metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf_type)
    metadata.set_gguf_meta_model(writer)


def _add_text_metadata(writer: gguf.GGUFWriter, ckpt: _Checkpoint, file_type: gguf.LlamaFileType) -> None:
    h = ckpt.text
    writer.add_block_count(h.layers)
    writer.add_context_length(h.context_length)
    writer.add_embedding_length(h.hidden)
    writer.add_feed_forward_length(h.ffn)
    writer.add_head_count(h.heads)
    writer.add_head_count_kv(h.kv_heads)
    writer.add_rope_freq_base(h.rope_theta)
    writer.add_layer_norm_rms_eps(h.rms_norm_eps)
    writer.add_key_length(h.head_dim)
    writer.add_value_length(h.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(h.vocab_size)
    writer.add_rope_dimension_count(h.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, ckpt)


def _add_vocab(writer: gguf.GGUFWriter, ckpt: _Checkpoint) -> None:
    tok_cfg = read_json(ckpt.folder / TOKENIZER_CONFIG_FILE, required=False) or {}
    if isinstance(tok_cfg.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(tok_cfg["add_prefix_space"])
    vocab = read_bpe_vocab(ckpt.folder, ckpt.text.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    # gguf's SpecialVocab is the code llama.cpp's converter uses for merges, special ids, add_bos/eos.
    vocab_logger = logging.getLogger("gguf.vocab")
    old_level = vocab_logger.level
    vocab_logger.setLevel(logging.ERROR)  # it warns about config.json ids it then rightly ignores
    try:
        special = gguf.SpecialVocab(ckpt.folder, load_merges=True, n_vocab=ckpt.text.vocab_size)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot read the tokenizer ({e})", ckpt.folder / TOKENIZER_FILE) from None
    finally:
        vocab_logger.setLevel(old_level)
    if not special.merges:
        raise ModelError("tokenizer.json has no BPE merges", ckpt.folder / TOKENIZER_FILE)
    if special.chat_template is None:
        special.chat_template = read_chat_template(ckpt.folder)
    # llama.cpp's current gguf-py reads a ByteLevel post-processor as "add neither BOS nor EOS"
    # (and lets it win over tokenizer_config); older gguf releases on PyPI skip it. Do it here.
    tok = read_json(ckpt.folder / TOKENIZER_FILE) or {}
    post = tok.get("post_processor") or {}
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    kinds = {p.get("type") for p in processors if isinstance(p, dict)}
    if "ByteLevel" in kinds and not kinds & {"TemplateProcessing", "RobertaProcessing"}:
        special.add_special_token["bos"] = False
        special.add_special_token["eos"] = False
    special.add_to_gguf(writer, quiet=True)


def _add_vision_metadata(writer: gguf.GGUFWriter, ckpt: _Checkpoint, file_type: gguf.LlamaFileType) -> None:
    v = ckpt.vision
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(v.projection_dim)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden)
    writer.add_vision_feed_forward_length(v.ffn)
    writer.add_vision_block_count(v.layers)
    writer.add_vision_head_count(v.heads)
    writer.add_vision_image_mean(v.image_mean)
    writer.add_vision_image_std(v.image_std)
    writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    writer.add_vision_projector_scale_factor(v.scale_factor)
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(v.preproc_image_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------- writing


def model_file_name(name: str, quant: str) -> str:
    return f"{name}-{quant}.gguf"


def mmproj_file_name(name: str, quant: str) -> str:
    return f"mmproj-{name}-{quant}.gguf"


def write_text_model(ckpt: _Checkpoint, path: Path, out_type: str, on_tensor: Progress | None = None) -> Path:
    """The LM as one GGUF of type F32/F16/BF16/Q8_0 (direct, no llama.cpp quantizer)."""
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    tensors = plan_text_tensors(ckpt, DIRECT_TYPES[out_type])
    declare_tensors(writer, tensors)
    _add_general_metadata(writer, ckpt, gguf.GGUFType.MODEL)
    _add_text_metadata(writer, ckpt, FILE_TYPES[out_type])
    return write_gguf(writer, path, tensors, on_tensor)


def write_mmproj(ckpt: _Checkpoint, path: Path, out_type: str, on_tensor: Progress | None = None) -> Path:
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    tensors = plan_vision_tensors(ckpt, DIRECT_TYPES[out_type])
    declare_tensors(writer, tensors)
    _add_general_metadata(writer, ckpt, gguf.GGUFType.MMPROJ)
    _add_vision_metadata(writer, ckpt, FILE_TYPES[out_type])
    return write_gguf(writer, path, tensors, on_tensor)


def convert_smolvlm2(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quant: str = "Q8_0",
    mmproj_quant: str = "F16",
    *,
    n_threads: int | None = None,
    on_tensor: Progress | None = None,
) -> ConvertedVlm:
    """Convert a SmolVLM2 checkpoint folder into `{Name}-{quant}.gguf` + `mmproj-{Name}-{mmproj_quant}.gguf`.

    quant: F16, Q8_0, Q4_K_M or Q5_K_M (the latter three through llama.cpp's quantizer);
    mmproj_quant: F16 or Q8_0. on_tensor(i, n, name) is called after each tensor is written.
    """
    quant = _check_quant(quant, LM_QUANTS, "model")
    mmproj_quant = _check_quant(mmproj_quant, MMPROJ_QUANTS, "mmproj")
    ckpt = _Checkpoint(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlmError("output path exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)

    mmproj_path = write_mmproj(ckpt, out / mmproj_file_name(ckpt.name, mmproj_quant), mmproj_quant, on_tensor)
    model_path = out / model_file_name(ckpt.name, quant)
    if quant == "F16":
        write_text_model(ckpt, model_path, "F16", on_tensor)
    else:
        from vlmcli.convert.quantize import quantize_gguf

        intermediate = out / f".{ckpt.name}-F16.intermediate.gguf"
        try:
            write_text_model(ckpt, intermediate, "F16", on_tensor)
            quantize_gguf(intermediate, model_path, quant, n_threads=n_threads)
        finally:
            intermediate.unlink(missing_ok=True)
    return ConvertedVlm(model=model_path, mmproj=mmproj_path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Convert a SmolVLM2 Hugging Face checkpoint to GGUF (model + mmproj).")
    parser.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint folder")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current folder)")
    parser.add_argument("--quant", default="Q8_0", help=f"model type: {', '.join(LM_QUANTS)} (default Q8_0)")
    parser.add_argument("--mmproj-quant", default="F16", help=f"mmproj type: {', '.join(MMPROJ_QUANTS)} (default F16)")
    args = parser.parse_args(argv)
    try:
        result = convert_smolvlm2(args.checkpoint, args.out, args.quant, args.mmproj_quant)
    except VlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.model)
    print(result.mmproj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
