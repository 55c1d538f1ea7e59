"""Hugging Face CLIPModel checkpoint -> one two-tower CLIP GGUF (clip.cpp's legacy layout).

    python scripts/convert/clip.py CHECKPOINT_DIR --out DIR [--quant F16|F32|Q8_0|Q5_1|Q5_0|Q4_1|Q4_0]

Layout (clip.cpp's legacy two-tower one): arch "clip" with both encoders, hyper-parameters under
clip.text.* / clip.vision.*, clip.logit_scale (the stored log value), the full CLIP BPE vocabulary and
merges under tokenizer.ggml.*, tensors t.* (text), v.* (vision), text_projection / visual_projection
(the table in vlmcli/gguf/clip_layout.py, which the loader checks files against).
The legacy naming quirk is kept for compatibility with clip.cpp readers: HF `mlp.fc1` (the first,
widening linear layer) is stored as `ffn_down` and `mlp.fc2` as `ffn_up`.

Types: the 2-D matmul weights (attention q/k/v/out, the two MLP layers, the projections) take the
requested type (F32, F16, or a ggml quantization whose block is 32 wide; a matrix whose rows are not a
multiple of 32 falls back to F16); the patch embedding (a 4-D convolution kernel) is always F16, as
clip.cpp's converter writes it (its conv_2d has only an F16 kernel); norms, biases and the token,
position and class embeddings stay F32. Tensors are streamed one at a time, so memory stays around
one tensor.

clip.cpp (monatis/clip.cpp) reads these files unchanged: they carry every key its loader requires
(general.description, general.file_type in its numbering, i.e. the ggml type id of the matmul
weights, general.name, clip.*, tokenizer.ggml.tokens), its tensor names, shapes and count, and only
types its ops accept. What vlm needs beyond that (merges, logit scale, bos/eos ids) is in extra keys
clip.cpp ignores.
"""

from __future__ import annotations

import argparse
import json
import math
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

from vlmcli.convert.gguf_out import PlannedTensor, QType, declare_tensors, encode, write_gguf
from vlmcli.errors import ModelError, VlmError
from vlmcli.gguf.clip_layout import PATCH_EMBEDDING, clip_tensors
from vlmcli.gguf.ggml_types import CLIP_MATMUL_TYPES
from vlmcli.gguf.layout import GgufTensor

QUANT_TYPES = ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # the types clip.cpp reads
QUANT_BLOCK = 32
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# What clip.cpp's converter writes as general.description for a model with both towers.
DESCRIPTION = "two-tower CLIP model"

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (used for keys a config omits).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
PROJECTION_DIM_DEFAULT = 512
# clip.use_gelu is one flag for both towers: true = erf gelu, false = quick_gelu (x * sigmoid(1.702 x)).
ACTIVATIONS = {"quick_gelu": False, "gelu": True}

# Buffers some checkpoints carry that are not weights.
IGNORED_TENSORS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


@dataclass
class Tower:
    width: int
    ffn: int
    layers: int
    heads: int
    eps: float
    activation: str


@dataclass
class ClipHParams:
    text: Tower
    vision: Tower
    vocab_size: int
    context_length: int
    image_size: int
    patch_size: int
    num_channels: int
    projection_dim: int
    use_gelu: bool

    # The hyper-parameters vlmcli.gguf.clip_layout's table follows from (its ClipDims).
    @property
    def text_width(self) -> int:
        return self.text.width

    @property
    def text_ffn(self) -> int:
        return self.text.ffn

    @property
    def text_layers(self) -> int:
        return self.text.layers

    @property
    def vision_width(self) -> int:
        return self.vision.width

    @property
    def vision_ffn(self) -> int:
        return self.vision.ffn

    @property
    def vision_layers(self) -> int:
        return self.vision.layers

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError("missing from the checkpoint", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read ({e})", path) from None
    except json.JSONDecodeError as e:
        raise ModelError(f"not valid JSON ({e.msg}, line {e.lineno})", path) from None


def _int(cfg: dict, key: str, path: Path) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{key} must be a positive integer, got {value!r}", path)
    return value


def read_hparams(checkpoint: Path) -> ClipHParams:
    """Hyper-parameters from config.json, with transformers' defaults for omitted keys."""
    path = checkpoint / "config.json"
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ModelError("config.json is not a JSON object", path)
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "clip" and "CLIPModel" not in archs:
        what = ", ".join(archs) or cfg.get("model_type") or "unknown"
        raise ModelError(f"not a CLIPModel checkpoint (architecture: {what})", path)
    # Old configs used text_config_dict / vision_config_dict.
    text_cfg = {**TEXT_DEFAULTS, **(cfg.get("text_config") or cfg.get("text_config_dict") or {})}
    vision_cfg = {**VISION_DEFAULTS, **(cfg.get("vision_config") or cfg.get("vision_config_dict") or {})}

    def tower(c: dict) -> Tower:
        act = c["hidden_act"]
        if act not in ACTIVATIONS:
            raise ModelError(f"unsupported activation {act!r} (CLIP uses quick_gelu or gelu)", path)
        t = Tower(
            _int(c, "hidden_size", path),
            _int(c, "intermediate_size", path),
            _int(c, "num_hidden_layers", path),
            _int(c, "num_attention_heads", path),
            float(c["layer_norm_eps"]),
            act,
        )
        if t.width % t.heads:
            raise ModelError(f"hidden_size {t.width} is not divisible by num_attention_heads {t.heads}", path)
        return t

    text, vision = tower(text_cfg), tower(vision_cfg)
    if text.activation != vision.activation:
        raise ModelError(
            f"the towers use different activations ({text.activation} / {vision.activation}); "
            "the GGUF layout has one clip.use_gelu flag",
            path,
        )
    hp = ClipHParams(
        text=text,
        vision=vision,
        vocab_size=_int(text_cfg, "vocab_size", path),
        context_length=_int(text_cfg, "max_position_embeddings", path),
        image_size=_int(vision_cfg, "image_size", path),
        patch_size=_int(vision_cfg, "patch_size", path),
        num_channels=_int(vision_cfg, "num_channels", path),
        projection_dim=_int(
            {"projection_dim": cfg.get("projection_dim", PROJECTION_DIM_DEFAULT)}, "projection_dim", path
        ),
        use_gelu=ACTIVATIONS[text.activation],
    )
    if hp.image_size % hp.patch_size:
        raise ModelError(f"image_size {hp.image_size} is not a multiple of patch_size {hp.patch_size}", path)
    if hp.num_channels != 3:
        raise ModelError(f"num_channels {hp.num_channels} (CLIP takes RGB, 3 channels)", path)
    return hp


def read_preprocessing(checkpoint: Path) -> tuple[list[float], list[float]]:
    """image_mean / image_std from preprocessor_config.json (CLIP's defaults if the file is absent)."""
    path = checkpoint / "preprocessor_config.json"
    if not path.exists():
        return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    cfg = _read_json(path)
    values = []
    for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        v = cfg.get(key, default) if isinstance(cfg, dict) else None
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ModelError(f"{key} must be a list of 3 numbers, got {v!r}", path)
        if key == "image_std" and any(x <= 0 for x in v):
            raise ModelError(f"image_std must be positive, got {v!r}", path)
        values.append([float(x) for x in v])
    return values[0], values[1]


def _merges_from_list(raw: Any, path: Path) -> list[str]:
    """tokenizers writes merges as "a b" strings (older) or [a, b] pairs (tokenizers >= 0.20)."""
    if not isinstance(raw, list):
        raise ModelError("model.merges is not a list", path)
    merges = []
    for m in raw:
        if isinstance(m, str) and len(m.split(" ")) == 2:
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise ModelError(f"malformed merge entry {m!r}", path)
    return merges


def _tokens_in_id_order(vocab: dict[str, int], path: Path) -> list[str]:
    if not isinstance(vocab, dict) or not vocab:
        raise ModelError("vocabulary is missing or not a token -> id map", path)
    n = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * n
    for tok, i in vocab.items():
        if not isinstance(i, int) or i < 0:
            raise ModelError(f"bad id {i!r} for token {tok!r}", path)
        tokens[i] = tok
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ModelError(f"vocabulary has no token for id {missing[0]} ({len(missing)} ids missing)", path)
    return [t for t in tokens if t is not None]  # all of them (checked above), typed as such


def read_tokenizer(checkpoint: Path) -> tuple[list[str], list[str], Path]:
    """(tokens in id order, merges in rank order, the file they came from): tokenizer.json, else
    vocab.json + merges.txt."""
    tj = checkpoint / "tokenizer.json"
    if tj.exists():
        data = _read_json(tj)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            raise ModelError("not a BPE tokenizer (model.type)", tj)
        vocab = dict(model.get("vocab") or {})
        for added in data.get("added_tokens") or []:
            vocab.setdefault(added["content"], added["id"])
        return _tokens_in_id_order(vocab, tj), _merges_from_list(model.get("merges"), tj), tj
    vj, mt = checkpoint / "vocab.json", checkpoint / "merges.txt"
    if vj.exists() or mt.exists():
        vocab = _read_json(vj)
        added_path = checkpoint / "added_tokens.json"
        if added_path.exists():
            vocab = {**_read_json(added_path), **vocab}
        try:
            lines = mt.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise ModelError("missing from the checkpoint (needed with vocab.json)", mt) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"cannot read ({e})", mt) from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = _merges_from_list([ln for ln in lines if ln.strip()], mt)
        return _tokens_in_id_order(vocab, vj), merges, vj
    raise ModelError("missing from the checkpoint (and no vocab.json + merges.txt either)", tj)


def check_tokenizer(tokens: list[str], merges: list[str], hp: ClipHParams, source: Path) -> tuple[int, int]:
    """The vocabulary must fit the model and hold every merge result; returns (bos_id, eos_id)."""
    if len(tokens) != hp.vocab_size:
        raise ModelError(f"tokenizer has {len(tokens)} tokens, the model's vocab_size is {hp.vocab_size}", source)
    index = {t: i for i, t in enumerate(tokens)}
    for special in (BOS_TOKEN, EOS_TOKEN):
        if special not in index:
            raise ModelError(f"tokenizer has no {special} token", source)
    for m in merges:
        if m.replace(" ", "") not in index:
            raise ModelError(f"merge {m!r} produces a token missing from the vocabulary", source)
    bos, eos = index[BOS_TOKEN], index[EOS_TOKEN]
    if eos != max(index.values()):
        # The text tower pools at the highest token id in each row, which must be the end token.
        raise ModelError(f"{EOS_TOKEN} must have the highest id (it has {eos})", source)
    return bos, eos


def expected_tensors(hp: ClipHParams) -> dict[str, GgufTensor]:
    """HF name -> the GGUF tensor it becomes, for every tensor the converter needs, in the file's order."""
    return {spec.source: spec for spec in clip_tensors(hp) if spec.source is not None}


def _load_weights(checkpoint: Path) -> dict:
    from vlmcli.convert.safetensors_io import load_safetensors

    has_safetensors = any(checkpoint.glob("*.safetensors")) or (checkpoint / "model.safetensors.index.json").exists()
    if not has_safetensors:
        for legacy in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack"):
            if (checkpoint / legacy).exists():
                raise ModelError(
                    "only safetensors weights are supported (no model.safetensors in this checkpoint; "
                    "download the repository's safetensors files)",
                    checkpoint / legacy,
                )
        raise ModelError("missing from the checkpoint", checkpoint / "model.safetensors")
    return load_safetensors(checkpoint)


def output_name(checkpoint: Path) -> str:
    """The model's name from its folder; for a huggingface_hub cache snapshot, the repository name."""
    p = checkpoint.resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1]
    return p.name


def _target_type(spec: GgufTensor, quant: str) -> str:
    if spec.name == PATCH_EMBEDDING:
        return "F16"  # the patch-embedding conv kernel: clip.cpp's conv_2d has only an F16 kernel
    if quant == "F32" or spec.types is not CLIP_MATMUL_TYPES:
        return "F32"
    if quant == "F16" or spec.shape[0] % QUANT_BLOCK:
        return "F16"
    return quant


def _encode(values: np.ndarray, qtype: QType) -> np.ndarray:
    """F32/F16 as numpy arrays; quantized types with ggml's own quantizer (the engine's bindings)."""
    if qtype in (QType.F32, QType.F16):
        return encode(values, qtype)
    from vlmcli.engines.ggml import quantize

    data = quantize(np.ascontiguousarray(values, dtype=np.float32), qtype.name)
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(values.shape[0], -1)


def convert_clip(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quant: str = "F16",
    *,
    name: str | None = None,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert an HF CLIPModel checkpoint folder to `out_dir/<name>-<quant>.gguf`; returns that path.

    `on_tensor(gguf_name, index, total)` is called after each tensor is written (for progress bars).
    Raises ModelError naming the offending file for a wrong or incomplete checkpoint.
    """
    import gguf

    checkpoint = Path(checkpoint_dir)
    if not checkpoint.is_dir():
        raise ModelError("not a checkpoint folder" if checkpoint.exists() else "no such checkpoint folder", checkpoint)
    quant = quant.upper()
    if quant not in QUANT_TYPES:
        raise VlmError(f"unsupported CLIP type {quant!r} (choose from {', '.join(QUANT_TYPES)})")

    hp = read_hparams(checkpoint)
    mean, std = read_preprocessing(checkpoint)
    tokens, merges, tok_source = read_tokenizer(checkpoint)
    bos_id, eos_id = check_tokenizer(tokens, merges, hp, tok_source)

    weights = _load_weights(checkpoint)
    index_file = checkpoint / "model.safetensors.index.json"
    weights_path = index_file if index_file.exists() else checkpoint / "model.safetensors"
    plan = expected_tensors(hp)
    for hf_name, spec in plan.items():
        shape = spec.hf_shape
        lazy = weights.get(hf_name)
        if lazy is None:
            raise ModelError(f"tensor {hf_name} is missing", weights_path)
        if tuple(lazy.shape) != shape:
            raise ModelError(
                f"tensor {hf_name} has shape {list(lazy.shape)}, config.json implies {list(shape)}", lazy.path
            )
        if lazy.dtype not in ("F32", "F16", "BF16", "F64"):
            raise ModelError(f"tensor {hf_name} has dtype {lazy.dtype}, expected floating point", lazy.path)
    unknown = sorted(set(weights) - set(plan) - {"logit_scale", *IGNORED_TENSORS})
    if unknown:
        raise ModelError(
            f"unexpected tensor {unknown[0]} ({len(unknown)} unexpected; not a plain CLIPModel?)",
            weights[unknown[0]].path,
        )
    if "logit_scale" not in weights:
        raise ModelError("tensor logit_scale is missing", weights_path)
    scale_values = weights["logit_scale"].load().astype(np.float64).reshape(-1)
    if scale_values.size != 1 or not math.isfinite(scale_values[0]):
        raise ModelError(
            f"logit_scale must be one finite number, got {scale_values.tolist()}", weights["logit_scale"].path
        )
    logit_scale = float(scale_values[0])

    model_name = name or output_name(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_path = out / f"{model_name}-{quant}.gguf"
    writer = gguf.GGUFWriter(None, arch="clip")
    writer.add_name(model_name)
    writer.add_description(DESCRIPTION)  # clip.cpp refuses a file without it
    # clip.cpp reads general.file_type as a ggml type id, not as llama.cpp's LlamaFileType (its
    # get_ftype() knows F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8 and throws on others).
    writer.add_file_type(int(QType[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_bool("clip.has_text_encoder", True)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", False)
    writer.add_bool("clip.use_gelu", hp.use_gelu)
    writer.add_float32("clip.logit_scale", logit_scale)
    for prefix, tower in (("clip.text", hp.text), ("clip.vision", hp.vision)):
        writer.add_uint32(f"{prefix}.embedding_length", tower.width)
        writer.add_uint32(f"{prefix}.feed_forward_length", tower.ffn)
        writer.add_uint32(f"{prefix}.projection_dim", hp.projection_dim)
        writer.add_uint32(f"{prefix}.attention.head_count", tower.heads)
        writer.add_float32(f"{prefix}.attention.layer_norm_epsilon", tower.eps)
        writer.add_uint32(f"{prefix}.block_count", tower.layers)
    writer.add_uint32("clip.text.context_length", hp.context_length)
    writer.add_uint32("clip.vision.image_size", hp.image_size)
    writer.add_uint32("clip.vision.patch_size", hp.patch_size)
    writer.add_array("clip.vision.image_mean", mean)
    writer.add_array("clip.vision.image_std", std)
    writer.add_string("tokenizer.ggml.model", "clip")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", bos_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", eos_id)

    def loader(hf_name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            values = weights[hf_name].load().astype(np.float32, copy=False)
            if not np.isfinite(values).all():
                raise ModelError(f"tensor {hf_name} holds NaN or infinite values", weights[hf_name].path)
            return values

        return load

    tensors = [
        PlannedTensor(spec.name, spec.hf_shape, QType[_target_type(spec, quant)], loader(hf_name))
        for hf_name, spec in plan.items()
    ]
    declare_tensors(writer, tensors)
    progress = (lambda i, n, name: on_tensor(name, i, n)) if on_tensor else None
    return write_gguf(writer, out_path, tensors, progress, encoder=_encode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a Hugging Face CLIPModel checkpoint to a CLIP GGUF.")
    parser.add_argument("checkpoint", help="folder with config.json, model.safetensors and the tokenizer files")
    parser.add_argument("--out", default=".", help="output folder (default: current folder)")
    parser.add_argument(
        "--quant", default="F16", choices=QUANT_TYPES, type=str.upper, help="type of the matmul weights (default F16)"
    )
    args = parser.parse_args(argv)
    try:
        path = convert_clip(args.checkpoint, args.out, args.quant)
    except VlmError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return e.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
