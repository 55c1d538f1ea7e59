"""`vlm eval` end to end on the tiny random-weight models (real llama.cpp / ggml, real files): report
shape and counts, per-item records and resume, missing images, bad dataset files, --predictions,
side-by-side runs, exit codes. The metric values of random weights mean nothing; the pipeline does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.cli import main


def _img(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((36, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


@pytest.fixture()
def vlm_args(smolvlm2_gguf) -> list[str]:
    return [
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "--threads",
        "1",
        "-n",
        "3",
        "--quiet",
    ]


# ----------------------------------------------------------------------------- VQA


@pytest.fixture()
def vqa_official(tmp_path: Path) -> dict[str, Path]:
    """A tiny VQAv2 in the official layout: questions JSON, annotations JSON, COCO-named images."""
    images = tmp_path / "val2014"
    for image_id in (42, 7):
        _img(images / f"COCO_val2014_{image_id:012d}.jpg", image_id)
    # Image 99 is missing on disk; question 5 has no annotation.
    qs = [
        {"image_id": 42, "question": "What colour is it?", "question_id": 1},
        {"image_id": 42, "question": "How many?", "question_id": 2},
        {"image_id": 7, "question": "Is it a cat?", "question_id": 3},
        {"image_id": 99, "question": "Where is it?", "question_id": 4},
        {"image_id": 7, "question": "Unannotated?", "question_id": 5},
    ]
    answers = {
        1: ["red"] * 6 + ["dark red"] * 4,
        2: ["two"] * 5 + ["2"] * 3 + ["3"] * 2,
        3: ["yes"] * 10,
        4: ["park"] * 10,
    }
    types = {1: "other", 2: "number", 3: "yes/no", 4: "other"}
    anns = [
        {
            "question_id": q,
            "image_id": {1: 42, 2: 42, 3: 7, 4: 99}[q],
            "answer_type": types[q],
            "question_type": "what",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ans)],
        }
        for q, ans in answers.items()
    ]
    qf, af = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "v2_mscoco_val2014_annotations.json"
    qf.write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    af.write_text(json.dumps({"annotations": anns}))
    return {"questions": qf, "annotations": af, "images": images}


def test_vqa_official_files_report_records_and_resume(vqa_official, vlm_args, tmp_path, capsys) -> None:
    out = tmp_path / "run.jsonl"
    args = [
        "eval",
        "vqa",
        str(vqa_official["questions"]),
        "--annotations",
        str(vqa_official["annotations"]),
        "--images",
        str(vqa_official["images"]),
        "--out",
        str(out),
        "--json",
        *vlm_args,
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 3, err  # the missing image's question failed; the rest was scored
    assert "1 question(s) have no annotation" in err
    assert "COCO_val2014_000000000099.jpg" in err
    report = json.loads(stdout)
    assert report["eval"] == "vqa" and report["questions"] == 4 and report["images"] == 3
    assert report["machine"]["cpu"] and report["machine"]["cores"]
    (run,) = report["runs"]
    assert run["items"] == 3 and run["failed"] == 1 and run["failed_images"] == 1
    assert run["quant"] == "Q8_0" and run["detail"] and run["model"]
    m = run["metrics"]
    assert m["questions"] == 3 and 0 <= m["accuracy"] <= 100
    assert set(m["per_answer_type"]) == {"other", "number", "yes/no"}
    s = run["speed"]
    assert s["items_run"] == 3 and s["images_run"] == 2 and s["wall_s"] > 0 and s["s_per_item"] > 0
    assert s["images_per_s"] > 0 and s["ttft_s"] > 0 and s["peak_rss_mb"] > 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3 and sum(1 for r in recs if r.get("error")) == 1
    good = [r for r in recs if not r.get("error")]
    qids = sorted(a["question_id"] for r in good for a in r["answers"])
    assert qids == ["1", "2", "3"]  # questions of one image share one record (one image encoding)
    assert all(r["prompt_suffix"] == "Answer the question using a single word or phrase." for r in good)
    assert all(
        a["prompt"].endswith("\nAnswer the question using a single word or phrase.") for r in good for a in r["answers"]
    )
    assert all(0 <= a["accuracy"] <= 1 and a["ttft_ms"] > 0 for r in good for a in r["answers"])

    # Rerun: nothing is run again (the missing image is retried and fails again), same scores.
    code, stdout2, err = run_cli(args, capsys)
    assert code == 3
    again = json.loads(stdout2)["runs"][0]
    assert again["metrics"] == m and again["speed"]["images_resumed"] == 2 and again["speed"]["items_run"] == 0
    assert len(out.read_text().splitlines()) == 3

    # The records score the same through --predictions (no model).
    code, stdout3, _ = run_cli(
        [
            "eval",
            "vqa",
            str(vqa_official["questions"]),
            "--annotations",
            str(vqa_official["annotations"]),
            "--images",
            str(vqa_official["images"]),
            "--predictions",
            str(out),
            "--json",
        ],
        capsys,
    )
    assert code == 3 and json.loads(stdout3)["runs"][0]["metrics"] == m


def test_vqa_predictions_in_the_official_results_format(vqa_official, tmp_path, capsys) -> None:
    preds = tmp_path / "results.json"
    # Q1: "Red." normalises to "red" (6 of 10 agree: 1.0); Q2: "two" -> "2" matches 8 -> 1.0; Q3: unanimous
    # ground truth is never normalised, so "Yes" scores 0 (the official quirk); Q4: "park" 1.0.
    preds.write_text(
        json.dumps(
            [
                {"question_id": 1, "answer": "Red."},
                {"question_id": 2, "answer": "two"},
                {"question_id": 3, "answer": "Yes"},
                {"question_id": 4, "answer": "park"},
            ]
        )
    )
    code, stdout, _ = run_cli(
        [
            "eval",
            "vqa",
            str(vqa_official["questions"]),
            "--annotations",
            str(vqa_official["annotations"]),
            "--images",
            str(vqa_official["images"]),
            "--predictions",
            str(preds),
            "--json",
        ],
        capsys,
    )
    assert code == 0
    m = json.loads(stdout)["runs"][0]["metrics"]
    assert m["accuracy"] == 75.0 and m["per_answer_type"] == {"other": 100.0, "number": 100.0, "yes/no": 0.0}
    # Markdown for a README.
    code, stdout, _ = run_cli(
        [
            "eval",
            "vqa",
            str(vqa_official["questions"]),
            "--annotations",
            str(vqa_official["annotations"]),
            "--images",
            str(vqa_official["images"]),
            "--predictions",
            str(preds),
            "--format",
            "markdown",
        ],
        capsys,
    )
    assert (
        code == 0
        and "| accuracy | yes/no | number | other |" in stdout
        and "| 75.00 | 0.00 | 100.00 | 100.00 |" in stdout
    )


def test_vqa_predictions_score_without_the_images(vqa_official, tmp_path, capsys) -> None:
    # Scoring reads no image (the official evaluation needs none): --images is not asked for.
    preds = tmp_path / "results.json"
    preds.write_text(json.dumps([{"question_id": 1, "answer": "red"}, {"question_id": 3, "answer": "yes"}]))
    questions, annotations = str(vqa_official["questions"]), str(vqa_official["annotations"])
    code, stdout, _ = run_cli(
        ["eval", "vqa", questions, "--annotations", annotations, "--predictions", str(preds), "--json"], capsys
    )
    run = json.loads(stdout)["runs"][0]
    assert code == 3 and run["items"] == 2 and run["failed"] == 2 and run["metrics"]["accuracy"] == 100.0
    # Running a model still needs them.
    code, _, err = run_cli(["eval", "vqa", questions, "--annotations", annotations], capsys)
    assert code != 0 and "--images" in err


def test_vqa_jsonl_side_by_side_details_and_limit(tmp_path, vlm_args, capsys) -> None:
    _img(tmp_path / "imgs" / "a.png", 1)
    _img(tmp_path / "imgs" / "b.png", 2)
    data = tmp_path / "vqa.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {"image": "imgs/a.png", "question": "What is it?", "answers": ["cat"] * 10},
                {"image": "imgs/a.png", "question": "Colour?", "answers": ["red"] * 10},
                {"image": "imgs/b.png", "question": "Is it?", "answers": ["yes"] * 10},
            ]
        )
        + "\n"
    )
    code, stdout, err = run_cli(
        ["eval", "vqa", str(data), "--detail", "low", "--detail", "high", "--limit", "2", "--json", *vlm_args], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["questions"] == 2 and report["images"] == 1
    assert [r["detail"] for r in report["runs"]] == ["low", "high"]
    assert all(r["items"] == 2 and r["failed"] == 0 for r in report["runs"])
    # The table names every run.
    code, stdout, _ = run_cli(["eval", "vqa", str(data), "--detail", "low", "--limit", "1", *vlm_args], capsys)
    assert code == 0 and "accuracy" in stdout and "low" in stdout and "cores" in stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"image": "a.png", "question": "q"}\n', "line 1: missing field 'answers'"),
        ('{"image": "a.png", "question": "q", "answers": "yes"}\n', "line 1.answers: expected list, got str"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_vqa_bad_jsonl_names_the_file_and_the_field(tmp_path, capsys, content, message) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    code, _, err = run_cli(["eval", "vqa", str(data), "--predictions", str(data)], capsys)
    assert code == 1 and f"vlm: error: {data}: " in err and message in err and "Traceback" not in err


def test_vqa_bad_official_files(vqa_official, tmp_path, capsys) -> None:
    bad = tmp_path / "anns.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 1, "image_id": 42}]}))
    code, _, err = run_cli(
        [
            "eval",
            "vqa",
            str(vqa_official["questions"]),
            "--annotations",
            str(bad),
            "--images",
            str(vqa_official["images"]),
            "--predictions",
            str(bad),
        ],
        capsys,
    )
    assert code == 1 and f"{bad}: annotations[0]: missing field 'answers'" in err
    code, _, err = run_cli(
        ["eval", "vqa", str(vqa_official["questions"]), "--images", str(vqa_official["images"])], capsys
    )
    assert code == 1 and "--annotations" in err
    code, _, err = run_cli(["eval", "vqa", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 1 and "no such file" in err


# ----------------------------------------------------------------------------- captions


def test_caption_coco_json_report_and_resume(tmp_path, vlm_args, capsys) -> None:
    for i in range(3):
        _img(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    doc = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(4)],  # image 3: no file
        "annotations": [
            {"image_id": i, "id": 10 * i + k, "caption": f"A photo number {i}, take {k}."}
            for i in range(4)
            for k in range(2)
        ],
    }
    data = tmp_path / "captions_val2014.json"
    data.write_text(json.dumps(doc))
    out = tmp_path / "caps.jsonl"
    args = ["eval", "caption", str(data), "--images", str(tmp_path / "val2014"), "--out", str(out), "--json", *vlm_args]
    code, stdout, err = run_cli(args, capsys)
    assert code == 3, err
    report = json.loads(stdout)
    (run,) = report["runs"]
    assert report["images"] == 4 and run["items"] == 3 and run["failed"] == 1
    assert (
        set(run["metrics"]) >= {"CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"}
        and run["metrics"]["images"] == 3
    )
    assert run["speed"]["images_run"] == 3 and run["speed"]["ttft_s"] > 0
    code, stdout2, _ = run_cli(args, capsys)
    assert code == 3 and json.loads(stdout2)["runs"][0]["metrics"] == run["metrics"]
    assert json.loads(stdout2)["runs"][0]["speed"]["images_resumed"] == 3


def test_caption_karpathy_split_and_predictions(tmp_path, capsys) -> None:
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        _img(tmp_path / "val2014" / name, len(name))
    doc = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "x.jpg",
                "split": "test",
                "cocoid": 1,
                "sentences": [
                    {"raw": "A dog runs on the grass.", "tokens": []},
                    {"raw": "A brown dog running.", "tokens": []},
                ],
            },
            {
                "filepath": "val2014",
                "filename": "y.jpg",
                "split": "test",
                "cocoid": 2,
                "sentences": [{"raw": "A cat sleeps on a bed.", "tokens": []}],
            },
            {
                "filepath": "val2014",
                "filename": "z.jpg",
                "split": "train",
                "cocoid": 3,
                "sentences": [{"raw": "Train only.", "tokens": []}],
            },
        ],
    }
    data = tmp_path / "dataset_coco.json"
    data.write_text(json.dumps(doc))
    preds = tmp_path / "results.json"
    preds.write_text(
        json.dumps(
            [
                {"image_id": 1, "caption": "A dog runs on the grass."},
                {"image_id": 2, "caption": "A cat sleeps on a bed."},
            ]
        )
    )
    code, stdout, err = run_cli(["eval", "caption", str(data), "--predictions", str(preds), "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    m = report["runs"][0]["metrics"]
    assert report["images"] == 2 and m["images"] == 2
    assert m["BLEU-1"] == pytest.approx(1.0) and m["ROUGE-L"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "zs"
    for c, name in enumerate(("cat", "dog", "car")):
        for k in range(2):
            _img(root / name / f"{k}.png", 10 * c + k)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_zeroshot_report_records_resume_and_templates(image_folder, clip_gguf, tmp_path, capsys) -> None:
    out = tmp_path / "zs.jsonl"
    args = [
        "eval",
        "zeroshot",
        str(image_folder),
        "-m",
        str(clip_gguf),
        "--template",
        "a photo of a {}.",
        "--template",
        "a drawing of a {}.",
        "--out",
        str(out),
        "--json",
        "--quiet",
        "--threads",
        "1",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 3, err
    report = json.loads(stdout)
    assert report["classes"] == 3 and report["templates"] == 2 and report["images"] == 7
    (run,) = report["runs"]
    assert run["items"] == 6 and run["failed"] == 1
    m = run["metrics"]
    assert m["images"] == 6 and 0 <= m["top1"] <= m["top5"] == 100.0  # 3 classes: always in the top 5
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 7 and all(len(r["classes"]) == 3 for r in recs if not r.get("error"))
    assert recs[0]["candidates"]["count"] == 3  # a digest, not the class list, in every record
    code, stdout2, _ = run_cli(args, capsys)
    assert code == 3 and json.loads(stdout2)["runs"][0]["metrics"] == m
    assert json.loads(stdout2)["runs"][0]["speed"]["images_resumed"] == 6


def test_zeroshot_class_names_file_and_count_mismatch(image_folder, clip_gguf, tmp_path, capsys) -> None:
    names = tmp_path / "names.txt"
    names.write_text("car\tautomobile\ncat\tkitty\ndog\tpuppy\n")
    code, stdout, err = run_cli(
        [
            "eval",
            "zeroshot",
            str(image_folder),
            "-m",
            str(clip_gguf),
            "--classes",
            str(names),
            "--limit",
            "2",
            "--json",
            "--quiet",
            "--threads",
            "1",
        ],
        capsys,
    )
    assert code == 0, err and json.loads(stdout)["runs"][0]["items"] == 2
    names.write_text("one\ntwo\n")
    code, _, err = run_cli(
        ["eval", "zeroshot", str(image_folder), "-m", str(clip_gguf), "--classes", str(names)], capsys
    )
    assert code == 1 and "3 class folders but 2 class names" in err
    code, _, err = run_cli(
        ["eval", "zeroshot", str(image_folder), "-m", str(clip_gguf), "--classes", "imagenet"], capsys
    )
    assert code == 1 and "3 class folders but 1000 class names" in err


def test_retrieval_jsonl_report_and_npy_resume(tmp_path, clip_gguf, capsys) -> None:
    for i in range(4):
        _img(tmp_path / "r" / f"{i}.png", 40 + i)
    data = tmp_path / "ret.jsonl"
    lines = [
        {"image": f"r/{i}.png", "captions": [f"picture {i}", f"image number {i}", "a shared caption"]} for i in range(4)
    ]
    lines.append({"image": "r/missing.png", "captions": ["gone"]})
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "emb.npy"
    args = [
        "eval",
        "retrieval",
        str(data),
        "-m",
        str(clip_gguf),
        "--out",
        str(out),
        "--json",
        "--quiet",
        "--threads",
        "1",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 3, err
    report = json.loads(stdout)
    (run,) = report["runs"]
    assert report["images"] == 5 and run["items"] == 4 and run["failed"] == 1
    m = run["metrics"]
    assert m["images"] == 4 and m["texts"] == 12
    assert all(0 <= m[d][f"R@{k}"] <= 100 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert m["text_to_image"]["R@5"] == 100.0  # 4 images: the right one is always in the top 5
    assert np.load(out).shape[0] == 4 + 10  # 4 images + 10 distinct captions ("gone", of the missing image, too)
    code, stdout2, _ = run_cli(args, capsys)
    assert (
        json.loads(stdout2)["runs"][0]["metrics"] == m
        and json.loads(stdout2)["runs"][0]["speed"]["images_resumed"] == 4
    )


def test_eval_usage_errors(tmp_path, capsys) -> None:
    code, _, err = run_cli(["eval", "retrieval", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "x.jsonl")], capsys)
    assert code == 2 and "--out is the .npy file" in err
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps({"image": "a.png", "question": "q", "answers": ["a"]}) + "\n")
    code, _, err = run_cli(["eval", "vqa", str(data), "--predictions", str(data), "--format", "html"], capsys)
    assert code == 2 and "--format html" in err


def test_vqa_resume_redoes_an_image_whose_questions_grew(tmp_path, vlm_args, capsys) -> None:
    _img(tmp_path / "a.png", 1)
    data = tmp_path / "vqa.jsonl"
    data.write_text(
        "\n".join(json.dumps({"image": "a.png", "question": q, "answers": ["x"] * 10}) for q in ("One?", "Two?")) + "\n"
    )
    out = tmp_path / "run.jsonl"
    code, stdout, _ = run_cli(
        ["eval", "vqa", str(data), "--limit", "1", "--out", str(out), "--json", *vlm_args], capsys
    )
    assert code == 0 and json.loads(stdout)["runs"][0]["items"] == 1
    code, stdout, _ = run_cli(["eval", "vqa", str(data), "--out", str(out), "--json", *vlm_args], capsys)
    run = json.loads(stdout)["runs"][0]
    assert code == 0 and run["items"] == 2 and run["speed"]["items_run"] == 2
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]  # the image keeps one record
    assert [a["question_id"] for a in rec["answers"]] == ["1", "2"]


def test_shipped_imagenet_prompt_set_and_licence() -> None:
    from vlmcli.tasks.eval.imagenet import DATA, imagenet_classes, imagenet_templates

    classes, templates = imagenet_classes(), imagenet_templates()
    assert len(classes) == 1000 and len(templates) == 80 and len(set(templates)) == 80
    assert classes[0] == "tench" and classes[999] == "toilet paper" and classes[207] == "Golden Retriever"
    assert classes[657] == classes[744] == "missile" and classes[836] == classes[837] == "sunglasses"  # as published
    assert all("{}" in t for t in templates) and templates[0] == "a bad photo of a {}."
    assert (
        "MIT License" in (DATA / "LICENSE-CLIP.txt").read_text() and "OpenAI" in (DATA / "LICENSE-CLIP.txt").read_text()
    )


def test_select_sample_and_limit() -> None:
    from vlmcli.tasks.eval.data import select

    items = list(range(100))
    a = select(items, sample=10, seed=3)
    assert (
        a == sorted(a)
        and len(a) == 10
        and a == select(items, sample=10, seed=3)
        and a != select(items, sample=10, seed=4)
    )
    assert select(items, limit=5) == [0, 1, 2, 3, 4] and select(items, limit=3, sample=10, seed=3) == a[:3]


def test_vqa_best_of_rows_and_the_scaling_law(tmp_path, vlm_args, capsys) -> None:
    lines = []
    for i in range(2):
        lines.append(
            json.dumps(
                {
                    "image": str(_img(tmp_path / f"{i}.png", i)),
                    "question": "What colour?",
                    "answers": ["red"] * 5 + ["blue"] * 5,
                }
            )
        )
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "runs.jsonl"
    args = ["eval", "vqa", str(data), "--best-of", "1,2,3", "--select", "vote", "--out", str(out), "--json", *vlm_args]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert [r["best_of"] for r in report["runs"]] == [1, 2, 3]
    assert all(r["items"] == 2 for r in report["runs"])
    (fit,) = report["scaling"]
    assert fit["metric"] == "accuracy" and [k for k, _ in fit["points"]] == [1, 2, 3]
    assert [q for _, q in fit["points"]] == [r["metrics"]["accuracy"] for r in report["runs"]]
    # Each N keeps its own records in --out (best_of is part of the identity): 2 images x 3 settings.
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["options"].get("best_of", 1) for r in recs) == [1, 1, 2, 2, 3, 3]
    assert all(len(r["answers"][0]["candidates"]) == r["options"]["best_of"] for r in recs if "best_of" in r["options"])
    code, table, _ = run_cli(args[: -len(vlm_args) - 1] + vlm_args, capsys)  # the table: an N column and the fit
    assert code == 0 and " N " in table and "scaling, " in table and "accuracy(N) = " in table


def test_scaling_law_fit_recovers_its_parameters() -> None:
    from vlmcli.metrics.scaling import fit_scaling_law

    fit = fit_scaling_law([(k, 62.0 - 9.0 / k**0.7) for k in (1, 2, 4, 8)])
    assert fit is not None
    assert (fit.q_inf, fit.a, fit.gamma) == (
        pytest.approx(62.0, abs=1e-3),
        pytest.approx(9.0, abs=1e-3),
        pytest.approx(0.7, abs=1e-3),
    )
    assert fit_scaling_law([(1, 50.0), (2, 55.0)]) is None  # two points: no fit


# ----------------------------------------------------------------------------- the shipped sample set


def test_shipped_sample_set_is_complete_and_licensed() -> None:
    """Every file the sample set names exists and decodes, each photo has its licence line, VQA items
    carry 10 answers and a VQAv2 answer type, and the class folders double as a zero-shot tree."""
    from vlmcli.images import load_image
    from vlmcli.tasks.eval.data import SAMPLE_FILES, SAMPLE_SET, load_captions, load_image_folder, load_vqa

    vqa = load_vqa(SAMPLE_FILES["vqa"])
    captions = load_captions(SAMPLE_FILES["caption"])
    folder = load_image_folder(SAMPLE_FILES["zeroshot"])
    notes = (SAMPLE_SET / "README.md").read_text()
    assert len(vqa) >= 20 and len({q.question_id for q in vqa}) == len(vqa)
    assert all(len(q.answers) == 10 and q.answer_type in ("yes/no", "number", "other") for q in vqa)
    assert {q.image for q in vqa} == {c.image for c in captions} == set(folder.paths)
    assert all(len(c.captions) == 5 for c in captions)
    assert len(folder.classes) == len(folder.paths) and "smoke test" in notes
    for path in folder.paths:
        assert load_image(path).size[0] > 0
        assert f"`{Path(path).relative_to(SAMPLE_SET).as_posix()}`" in notes  # its source and licence


def test_eval_sample_flag_runs_the_shipped_set(vlm_args, clip_gguf, tmp_path, capsys) -> None:
    """`--sample` alone (no count, no DATA) evaluates the shipped set; `--sample N` still subsets it."""
    from vlmcli.tasks.eval.data import SAMPLE_FILES, load_vqa

    code, stdout, err = run_cli(["eval", "vqa", "--sample", "--json", *vlm_args], capsys)
    assert code == 0, err
    assert "smoke test" in err
    report = json.loads(stdout)
    assert report["questions"] == len(load_vqa(SAMPLE_FILES["vqa"])) and report["runs"][0]["failed"] == 0
    code, stdout, err = run_cli(["eval", "vqa", "--sample", "3", "--seed", "2", "--json", *vlm_args], capsys)
    assert code == 0 and json.loads(stdout)["questions"] == 3, err
    code, stdout, err = run_cli(["eval", "zeroshot", "--json", "--sample", "-m", str(clip_gguf), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["runs"][0]["metrics"]["images"] == 6
    code, stdout, err = run_cli(["eval", "retrieval", "--sample", "--json", "-m", str(clip_gguf), "--quiet"], capsys)
    assert code == 0, err


def test_eval_without_data_or_sample_and_bare_sample_with_data(tmp_path, capsys) -> None:
    code, _, err = run_cli(["eval", "vqa"], capsys)
    assert code == 2 and "--sample" in err and "Traceback" not in err
    code, _, err = run_cli(["eval", "caption", str(tmp_path / "x.jsonl"), "--sample"], capsys)
    assert code == 2 and "--sample N" in err
