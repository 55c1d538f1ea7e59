"""Evaluation datasets: the official files (VQAv2, COCO captions, Karpathy splits), ImageFolder trees
and plain JSONL, read into items the evaluations run on. No model code; bad files raise VlmError
naming the file and the field.

    load_vqa(data, annotations, images)      -> [VqaItem]    VQAv2 questions + annotations JSON, or JSONL
    load_captions(data, images, split)       -> [CaptionItem] COCO captions JSON, Karpathy JSON, or JSONL
    load_image_folder(root, classes)         -> ImageFolder   one folder per class
    select(items, limit, sample, seed)       -> the subset to evaluate
    SAMPLE_SET                               the shipped sample set (vlmcli/data/sample/: a smoke test)
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlmcli.errors import VlmError
from vlmcli.files import read_lines

T = TypeVar("T")

# Six public-domain / CC0 photos with hand-written questions and captions, and one folder per class:
# what `vlm eval ... --sample` runs on out of the box. A smoke test of the pipeline, not a benchmark.
SAMPLE_SET = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE_FILES = {
    "vqa": SAMPLE_SET / "vqa.jsonl",
    "caption": SAMPLE_SET / "captions.jsonl",
    "retrieval": SAMPLE_SET / "captions.jsonl",
    "zeroshot": SAMPLE_SET,
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class VqaItem:
    question_id: str  # as text: VQAv2's are integers, JSONL's anything
    image: str  # path
    question: str
    answers: list[str]
    answer_type: str | None = None
    question_type: str | None = None


@dataclass
class CaptionItem:
    image: str  # path
    image_id: str  # COCO image id, Karpathy cocoid/imgid, or the JSONL's image
    captions: list[str]  # references, raw (tokenized at scoring time)


@dataclass
class ImageFolder:
    classes: list[str]  # folder names, sorted
    names: list[str]  # the class names the prompts use (folder names, or from a file)
    paths: list[str]
    labels: list[int]  # class index per path
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading files


def read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise VlmError("no such file", path) from None
    except IsADirectoryError:
        raise VlmError("is a folder, not a JSON file", path) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise VlmError(f"not valid JSON ({e})", path) from None
    except OSError as e:
        raise VlmError(f"cannot read ({e.strerror or e})", path) from None


def read_jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    out = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (UnicodeDecodeError, ValueError) as e:
                    raise VlmError(f"line {n}: not valid JSON ({e})", path) from None
                if not isinstance(obj, dict):
                    raise VlmError(f"line {n}: expected a JSON object, got {type(obj).__name__}", path)
                out.append((n, obj))
    except FileNotFoundError:
        raise VlmError("no such file", path) from None
    except IsADirectoryError:
        raise VlmError("is a folder, not a JSONL file", path) from None
    except OSError as e:
        raise VlmError(f"cannot read ({e.strerror or e})", path) from None
    if not out:
        raise VlmError("has no records", path)
    return out


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(obj, dict):
        raise VlmError(f"{where}: expected an object, got {type(obj).__name__}", path)
    if key not in obj:
        raise VlmError(f"{where}: missing field {key!r}", path)
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise VlmError(f"{where}.{key}: expected {names}, got {type(value).__name__}", path)
    return value


def _strings(obj: Any, key: str, where: str, path: Path) -> list[str]:
    value = _need(obj, key, list, where, path)
    if not value:
        raise VlmError(f"{where}.{key}: empty list", path)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise VlmError(f"{where}.{key}[{i}]: expected a string, got {type(v).__name__}", path)
    return list(value)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    return None if v is None else str(v)


def _image_path(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


# ----------------------------------------------------------------------------- VQA


_COCO_ID = re.compile(r"(\d{12})\.(?:jpe?g|png)$", re.IGNORECASE)


def coco_image_index(folder: Path) -> dict[int, str]:
    """image id -> path for a folder of COCO images (COCO_val2014_000000xxxxxx.jpg or 000000xxxxxx.jpg)."""
    if not folder.is_dir():
        raise VlmError("no such image folder", folder)
    index: dict[int, str] = {}
    with os.scandir(folder) as it:
        for entry in it:
            m = _COCO_ID.search(entry.name)
            if m:
                index.setdefault(int(m.group(1)), entry.path)
    return index


def load_vqa(
    data: Path,
    annotations: Path | None = None,
    images: Path | None = None,
    warn: Callable[[str], None] | None = None,
    need_images: bool = True,
) -> list[VqaItem]:
    """VQAv2's questions JSON + annotations JSON + image folder, or a JSONL of
    {image, question, answers: [...], question_id?, answer_type?, question_type?}. Scoring
    predictions reads no image (need_images False): without a folder, VQAv2 items name bare files."""
    warn = warn or (lambda _m: None)
    if data.suffix.lower() == ".jsonl":
        if annotations is not None:
            raise VlmError(
                "a JSONL dataset carries its answers; --annotations is for the VQAv2 questions JSON", annotations
            )
        base = images if images is not None else data.parent
        items = []
        seen: set[str] = set()
        for n, obj in read_jsonl_records(data):
            where = f"line {n}"
            qid = str(obj.get("question_id", n))
            if qid in seen:
                raise VlmError(f"{where}: question_id {qid} appears twice", data)
            seen.add(qid)
            items.append(
                VqaItem(
                    question_id=qid,
                    image=_image_path(_need(obj, "image", str, where, data), base),
                    question=_need(obj, "question", str, where, data),
                    answers=_strings(obj, "answers", where, data),
                    answer_type=_optional_str(obj, "answer_type"),
                    question_type=_optional_str(obj, "question_type"),
                )
            )
        return items
    if annotations is None:
        raise VlmError("a VQAv2 questions file needs its annotations: --annotations FILE", data)
    if images is None and need_images:
        raise VlmError("a VQAv2 questions file needs the image folder: --images DIR", data)
    qdoc = read_json(data)
    questions = _need(qdoc, "questions", list, "top level", data)
    adoc = read_json(annotations)
    anns = _need(adoc, "annotations", list, "top level", annotations)
    by_qid: dict[int, dict[str, Any]] = {}
    for i, a in enumerate(anns):
        where = f"annotations[{i}]"
        qid = _need(a, "question_id", int, where, annotations)
        answers = _need(a, "answers", list, where, annotations)
        if not answers:
            raise VlmError(f"{where}.answers: empty list", annotations)
        for j, ans in enumerate(answers):
            _need(ans, "answer", str, f"{where}.answers[{j}]", annotations)
        by_qid[qid] = a
    subtype = qdoc.get("data_subtype") if isinstance(qdoc, dict) else None
    index = coco_image_index(images) if images is not None else {}
    items = []
    unanswered = 0
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        qid = _need(q, "question_id", int, where, data)
        image_id = _need(q, "image_id", int, where, data)
        text = _need(q, "question", str, where, data)
        a = by_qid.get(qid)
        if a is None:
            unanswered += 1
            continue
        if a.get("image_id", image_id) != image_id:
            raise VlmError(
                f"annotation of question {qid}: image_id {a.get('image_id')} differs from the question's {image_id}",
                annotations,
            )
        name = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else f"{image_id:012d}.jpg"
        path = index.get(image_id) or str(images / name if images is not None else name)
        items.append(
            VqaItem(
                question_id=str(qid),
                image=path,
                question=text,
                answers=[ans["answer"] for ans in a["answers"]],
                answer_type=_optional_str(a, "answer_type"),
                question_type=_optional_str(a, "question_type"),
            )
        )
    if unanswered:
        warn(f"{data}: {unanswered} question(s) have no annotation in {annotations} and are left out")
    if not items:
        raise VlmError(f"no question has an annotation in {annotations}", data)
    return items


# ----------------------------------------------------------------------------- captions


def load_captions(data: Path, images: Path | None = None, split: str = "test") -> list[CaptionItem]:
    """COCO captions annotations JSON ({images, annotations}), a Karpathy split JSON ({images: [{filename,
    sentences, split}]}: `split` chooses, "all" takes every image), or JSONL {image, captions: [...]}."""
    if data.suffix.lower() == ".jsonl":
        base = images if images is not None else data.parent
        out = []
        for n, obj in read_jsonl_records(data):
            where = f"line {n}"
            image = _need(obj, "image", str, where, data)
            out.append(
                CaptionItem(
                    _image_path(image, base), str(obj.get("image_id", image)), _strings(obj, "captions", where, data)
                )
            )
        return out
    doc = read_json(data)
    base = images if images is not None else data.parent
    imgs = _need(doc, "images", list, "top level", data)
    if isinstance(doc, dict) and "annotations" in doc:
        return _coco_captions(doc, imgs, base, data)
    if imgs and isinstance(imgs[0], dict) and "sentences" in imgs[0]:
        return _karpathy(imgs, base, split, data)
    raise VlmError(
        "neither a COCO captions file (images + annotations) nor a Karpathy split (images with sentences)", data
    )


def _coco_captions(doc: dict[str, Any], imgs: list[Any], base: Path, data: Path) -> list[CaptionItem]:
    anns = _need(doc, "annotations", list, "top level", data)
    caps: dict[int, list[str]] = {}
    for i, a in enumerate(anns):
        where = f"annotations[{i}]"
        caps.setdefault(_need(a, "image_id", int, where, data), []).append(_need(a, "caption", str, where, data))
    out = []
    for i, im in enumerate(imgs):
        where = f"images[{i}]"
        image_id = _need(im, "id", int, where, data)
        file_name = _need(im, "file_name", str, where, data)
        if image_id in caps:
            out.append(CaptionItem(_image_path(file_name, base), str(image_id), caps[image_id]))
    if not out:
        raise VlmError("no image has a caption", data)
    return out


def _karpathy(imgs: list[Any], base: Path, split: str, data: Path) -> list[CaptionItem]:
    out = []
    for i, im in enumerate(imgs):
        where = f"images[{i}]"
        if split != "all" and _need(im, "split", str, where, data) != split:
            continue
        filename = _need(im, "filename", str, where, data)
        sentences = _need(im, "sentences", list, where, data)
        raws = [_need(s, "raw", str, f"{where}.sentences[{j}]", data) for j, s in enumerate(sentences)]
        if not raws:
            raise VlmError(f"{where}.sentences: empty list", data)
        filepath = im.get("filepath")
        path = base / filepath / filename if isinstance(filepath, str) and filepath else base / filename
        if not path.exists() and (base / filename).exists():
            path = base / filename
        image_id = im.get("cocoid", im.get("imgid", filename))
        out.append(CaptionItem(str(path), str(image_id), raws))
    if not out:
        raise VlmError(f"no image in split {split!r} (use --split train, val, test, restval or all)", data)
    return out


# ----------------------------------------------------------------------------- ImageFolder


def read_class_names(path: Path) -> list[str] | dict[str, str]:
    """One class name per line (in the sorted folder order), or FOLDER<TAB>name lines."""
    lines = read_lines(path, "class-names", strip=False)  # FOLDER<TAB>name: the tabs matter
    if lines and all("\t" in ln for ln in lines):
        return {k.strip(): v.strip() for k, v in (ln.split("\t", 1) for ln in lines)}
    return [ln.strip() for ln in lines]


def load_image_folder(
    root: Path, names: Sequence[str] | dict[str, str] | None = None, include_hidden: bool = False
) -> ImageFolder:
    """root/CLASS/... images (recursive inside each class folder, sorted); classes in sorted folder order."""
    if not root.is_dir():
        raise VlmError("no such folder", root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and (include_hidden or not e.name.startswith(".")))
    if not classes:
        raise VlmError("has no class folders (expected ROOT/CLASS/image.jpg)", root)
    if names is None:
        class_names = list(classes)
    elif isinstance(names, dict):
        missing = [c for c in classes if c not in names]
        if missing:
            raise VlmError(f"the class-names file has no name for folder {missing[0]!r}", root)
        class_names = [names[c] for c in classes]
    else:
        if len(names) != len(classes):
            raise VlmError(f"{len(classes)} class folders but {len(names)} class names", root)
        class_names = list(names)
    paths: list[str] = []
    labels: list[int] = []
    warnings = []
    for k, c in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if include_hidden or not d.startswith("."))
            found += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if f.lower().endswith(IMAGE_SUFFIXES) and (include_hidden or not f.startswith("."))
            ]
        if not found:
            warnings.append(f"class folder {c!r} has no images")
        paths += found
        labels += [k] * len(found)
    if not paths:
        raise VlmError("has no images in its class folders", root)
    return ImageFolder(classes, class_names, paths, labels, warnings)


# ----------------------------------------------------------------------------- subsets


def select(items: Sequence[T], limit: int | None = None, sample: int | None = None, seed: int = 0) -> list[T]:
    """--sample N (a seeded random subset, kept in dataset order), then --limit N (the first N)."""
    chosen = list(items)
    if sample is not None and sample < len(chosen):
        keep = sorted(random.Random(seed).sample(range(len(chosen)), sample))
        chosen = [chosen[i] for i in keep]
    if limit is not None:
        chosen = chosen[:limit]
    return chosen
