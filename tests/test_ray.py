"""Batch mode on a Ray cluster (`--ray`, vlmcli/tasks/ray_batch.py) on a real local Ray cluster (2 CPUs,
one per module) with the tiny models and real files: a Ray run writes the records a local run
writes (bad images included), resumes after its driver is killed, and retries the images of a
killed actor without losing or doubling any. Drivers run in this process (sharing its Ray
connection) or as subprocesses joining the cluster with `--ray auto`."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from photo_fixtures import write_photo

from vlmcli.cli import main

MAX_TOKENS = "4"
RAY = ["--ray", "--ray-workers", "2", "--ray-cpus", "1"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        object_store_memory=200 * 1024 * 1024,
    )
    yield
    ray.shutdown()


@pytest.fixture()
def vlm_args(smolvlm2_gguf) -> list[str]:
    return ["-m", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj), "--threads", "1", "-n", MAX_TOKENS]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _without_timings(records: list[dict]) -> list[dict]:
    # What describes the run, not the result: timings, and whether the encoding came from the cache.
    return sorted(
        ({k: v for k, v in r.items() if k not in ("timings", "cache")} for r in records), key=lambda r: r["path"]
    )


def test_caption_on_ray_writes_the_records_of_a_local_run(photos, tmp_path, vlm_args, capsys) -> None:
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    code, _, err = run_cli(["caption", str(photos), "--out", str(local), *vlm_args], capsys)
    assert code == 3, err
    code, out, err = run_cli(["caption", str(photos), "--out", str(remote), *vlm_args, *RAY], capsys)
    assert code == 3 and out == "", err
    assert "3 done, 0 skipped, 1 failed" in err and f"vlm: error: {photos / 'sub' / 'd.jpg'}: cannot decode" in err
    assert "Traceback" not in err
    a, b = jsonl(local), jsonl(remote)
    assert len(b) == 4 and _without_timings(a) == _without_timings(b)  # same captions (greedy), same error record
    assert all("prepare_ms" in r["timings"] for r in b)
    # Resume through Ray: nothing is done twice.
    code, _, err = run_cli(["caption", str(photos), "--out", str(remote), *vlm_args, *RAY], capsys)
    assert code == 3 and "0 done, 3 skipped, 1 failed" in err and len(jsonl(remote)) == 4
    # Sidecars written by the driver, from image bytes the driver shipped to the workers.
    code, _, err = run_cli(["caption", str(photos), "--sidecar", *vlm_args, *RAY, "--ray-ship-files"], capsys)
    assert code == 3, err
    for r in a:
        if not r.get("error"):
            assert Path(r["path"]).with_suffix(".txt").read_text().strip() == " ".join(r["caption"].split())


def test_classify_csv_and_embed_npy_on_ray(tmp_path, clip_gguf, capsys) -> None:
    root = tmp_path / "pics"
    for i in range(7):
        write_photo(root / ("deep" if i % 2 else "") / f"p{i}.png", 10 + i, (40 + i, 50))
    (root / "deep" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = ["--model", str(clip_gguf), "--threads", "1", "--batch-size", "3"]
    runs = {}
    for where, extra in (("local", []), ("ray", RAY)):
        out = tmp_path / f"{where}.csv"
        code, _, err = run_cli(
            ["classify", str(root), "--labels", "cat,dog,car", "-k", "2", "--out", str(out), *model, *extra], capsys
        )
        assert code == 3 and "7 done, 0 skipped, 1 failed" in err, err
        with open(out, newline="") as f:
            runs[where] = sorted(csv.DictReader(f), key=lambda r: r["path"])
    assert [r["path"] for r in runs["local"]] == [r["path"] for r in runs["ray"]]
    for x, y in zip(runs["local"], runs["ray"]):
        assert {k: v for k, v in x.items() if k not in ("score", "top")} == {
            k: v for k, v in y.items() if k not in ("score", "top")
        }
        assert x["score"] == y["score"]  # CLIP results do not depend on their batch-mates: the same text

    texts = ["--text", "a cat", "--text", "a dog"]
    emb = {}
    for where, extra in (("local", []), ("ray", RAY)):
        out = tmp_path / f"{where}.npy"
        code, _, err = run_cli(["embed", str(root), *texts, "--out", str(out), *model, *extra], capsys)
        assert code == 3, err
        meta = jsonl(out.with_suffix(".jsonl"))
        emb[where] = (np.load(out), {(r.get("path"), r["input"]): r for r in meta})
    (a, ma), (b, mb) = emb["local"], emb["ray"]
    assert a.shape == b.shape == (9, a.shape[1]) and ma.keys() == mb.keys() and len(ma) == 10
    for k, r in ma.items():
        s = mb[k]
        assert {x: v for x, v in r.items() if x not in ("row", "timings")} == {
            x: v for x, v in s.items() if x not in ("row", "timings")
        }
        assert (r["row"] is None) == (s["row"] is None)
        if r["row"] is not None:  # the engine's batch independence: the same float32 vector, bit for bit
            np.testing.assert_array_equal(a[r["row"]], b[s["row"]])


# ----------------------------------------------------------------------------- faults (drivers as subprocesses)


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "vlmcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            break
        time.sleep(0.02)
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _many(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "many"
    for i in range(n):
        write_photo(folder / f"{i:02d}.png", 100 + i)
    (folder / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


def _check_once_each(out: Path, folder: Path, n: int) -> list[dict]:
    recs = jsonl(out)
    paths = [r["path"] for r in recs]
    assert sorted(paths) == sorted([str(folder / f"{i:02d}.png") for i in range(n)] + [str(folder / "zz_bad.jpg")])
    assert len(set(paths)) == len(paths)  # none lost, none twice
    assert [r["path"] for r in recs if r.get("error")] == [str(folder / "zz_bad.jpg")]
    return recs


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_killed_driver_resumes_without_duplicates_or_gaps(tmp_path, smolvlm2_gguf, capsys, how) -> None:
    n = 24
    folder = _many(tmp_path, n)
    out = tmp_path / "out.jsonl"
    args = [
        "caption",
        str(folder),
        "--out",
        str(out),
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "-n",
        "8",
    ]
    proc = _spawn([*args, "--ray", "auto", "--ray-workers", "2", "--ray-cpus", "1"])
    seen = _wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert 3 <= seen
    before = out.read_bytes()
    assert before.count(b"\n") < n + 1, "the run finished before it could be killed"
    if how == "sigint":  # the first Ctrl-C: what runs on the actors finishes and is written, the rest waits
        assert proc.returncode == 130 and b"not started (interrupted)" in err and before.endswith(b"\n"), err
    else:
        assert proc.returncode == -signal.SIGKILL
    done_before = sum(1 for line in before.splitlines() if line.endswith(b"}") and b'"error"' not in line)
    code, _, err = run_cli([*args, *RAY], capsys)  # the driver's actors die with it; new ones start
    assert code == 3, err
    assert f"{done_before} skipped" in err
    _check_once_each(out, folder, n)


def _running_actor_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::VlmBatchWorker.run"):
                pids.append(int(d))
    return pids


def test_killed_actor_has_its_images_retried_on_another(tmp_path, smolvlm2_gguf) -> None:
    n = 24
    folder = _many(tmp_path, n)
    out = tmp_path / "out.jsonl"
    args = [
        "caption",
        str(folder),
        "--out",
        str(out),
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "-n",
        "8",
        "--ray",
        "auto",
        "--ray-workers",
        "2",
        "--ray-cpus",
        "1",
    ]
    proc = _spawn(args)
    _wait_for_lines(out, 2, proc)
    pids: list[int] = []
    end = time.monotonic() + 30
    while not pids and time.monotonic() < end and proc.poll() is None:
        pids = _running_actor_pids()
        time.sleep(0.01)
    assert pids, "no actor was running"
    assert out.read_bytes().count(b"\n") < n + 1, "the run finished before an actor could be killed"
    os.kill(pids[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert b"Ray worker" in err and b"died" in err and b"Traceback" not in err
    assert f"{n} done, 0 skipped, 1 failed".encode() in err
    _check_once_each(out, folder, n)


# ----------------------------------------------------------------------------- the command line


def test_ray_options_are_checked_before_any_work(photos, vlm_args, capsys) -> None:
    code, _, err = run_cli(["caption", str(photos), "--ray=photos", *vlm_args], capsys)
    assert code == 2 and "--ray: " in err and "not a cluster address" in err and err.count("\n") == 1
    code, _, err = run_cli(["caption", str(photos), "--ray-workers", "2", *vlm_args], capsys)
    assert code == 2 and "--ray-workers goes with --ray" in err


def test_without_ray_installed_one_line_says_how_to_install_it(photos) -> None:
    code = "import sys; sys.modules['ray'] = None; from vlmcli.cli import main; main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, "caption", str(photos), "--ray"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "vlm: error: batch mode on Ray needs Ray, an optional extra: pip install 'vlmcli[ray]'"


# ----------------------------------------------------------------------------- vlm eval --ray


def _vqa_dataset(root: Path) -> Path:
    """Relative image paths (the actors have their own working directory); one image is missing."""
    write_photo(root / "imgs" / "a.png", 1)
    write_photo(root / "imgs" / "b b.png", 2)
    data = root / "vqa.jsonl"
    rows = [
        ("imgs/a.png", "What is it?", "cat"),
        ("imgs/b b.png", "Is it red?", "yes"),
        ("imgs/a.png", "How many?", "2"),
        ("imgs/missing.png", "Where?", "park"),
    ]
    data.write_text("".join(json.dumps({"image": i, "question": q, "answers": [a] * 10}) + "\n" for i, q, a in rows))
    return data


def _eval_records(path: Path) -> list[dict]:
    """Records without what describes the run (timings, cache, each answer's time to first token)."""
    out = []
    for r in _without_timings(jsonl(path)):
        if "answers" in r:
            r = {**r, "answers": [{k: v for k, v in a.items() if k != "ttft_ms"} for a in r["answers"]]}
        out.append(r)
    return out


def test_eval_vqa_on_ray_reports_and_records_what_a_local_run_does(
    tmp_path, smolvlm2_gguf, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _vqa_dataset(tmp_path)
    model = [
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "--threads",
        "1",
        "-n",
        "3",
        "--quiet",
        "--json",
    ]
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"

    def run(out: Path, *extra: str, code: int = 3) -> dict:  # 3: the missing image's question fails, the rest is scored
        got, stdout, err = run_cli(["eval", "vqa", "vqa.jsonl", "--out", str(out), *model, *extra], capsys)
        assert got == code and "Traceback" not in err, err
        return json.loads(stdout)

    (want,) = run(local)["runs"]
    assert want["items"] == 3 and want["failed"] == 1 and want["speed"]["items_run"] == 3
    # Two of the questions, the image bytes shipped by the driver.
    (part,) = run(remote, "--limit", "2", *RAY, "--ray-ship-files", code=0)["runs"]
    assert part["items"] == 2 and part["speed"]["items_run"] == 2
    # All of them, resuming: the image whose questions grew is redone, the other resumed.
    report = run(remote, *RAY)
    (got,) = report["runs"]
    assert report["questions"] == 4 and report["images"] == 3
    assert got["metrics"] == want["metrics"] and (got["items"], got["failed"], got["failed_images"]) == (3, 1, 1)
    assert {k: got[k] for k in ("model", "file", "quant", "detail", "max_tiles")} == {
        k: want[k] for k in ("model", "file", "quant", "detail", "max_tiles")
    }
    s = got["speed"]
    assert s["items_run"] == 2 and s["images_run"] == 1 and s["ray_workers"] == 2
    assert s["wall_s"] > 0 and s["images_per_s"] > 0 and s["ttft_s"] > 0 and s["peak_rss_mb"] is None
    assert _eval_records(remote) == _eval_records(local)  # the same answers (greedy), accuracies, error record
    answers = {a["question_id"]: a["answer"] for r in jsonl(local) for a in r.get("answers") or []}
    assert {a["question_id"]: a["answer"] for r in jsonl(remote) for a in r.get("answers") or []} == answers
    # Once more: nothing left to run, the same scores.
    (again,) = run(remote, *RAY)["runs"]
    assert again["metrics"] == want["metrics"] and again["speed"]["items_run"] == 0 and len(jsonl(remote)) == 3


def test_eval_zeroshot_and_retrieval_on_ray_equal_local(tmp_path, clip_gguf, capsys) -> None:
    root = tmp_path / "zs"
    for c, name in enumerate(("cat", "dog", "car")):
        for k in range(2):
            write_photo(root / name / f"{k}.png", 10 * c + k)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = ["-m", str(clip_gguf), "--threads", "1", "--batch-size", "2", "--json", "--quiet"]
    reports, records = {}, {}
    for where, extra in (("local", []), ("ray", RAY)):
        out = tmp_path / f"zs-{where}.jsonl"
        code, stdout, err = run_cli(
            [
                "eval",
                "zeroshot",
                str(root),
                "--template",
                "a photo of a {}.",
                "--template",
                "a drawing of a {}.",
                "--out",
                str(out),
                *model,
                *extra,
            ],
            capsys,
        )
        assert code == 3, err
        reports[where], records[where] = json.loads(stdout)["runs"][0], _without_timings(jsonl(out))
    assert reports["ray"]["metrics"] == reports["local"]["metrics"] and reports["ray"]["items"] == 6
    assert reports["ray"]["speed"]["text_s"] > 0 and reports["ray"]["speed"]["ray_workers"] == 2
    for a, b in zip(records["local"], records["ray"], strict=True):
        assert a == b  # scores too: CLIP results do not depend on their batch-mates or on the process

    for i in range(3):
        write_photo(tmp_path / "r" / f"{i}.png", 40 + i)
    data = tmp_path / "ret.jsonl"
    data.write_text(
        "".join(
            json.dumps({"image": f"r/{i}.png", "captions": [f"picture {i}", "a shared caption"]}) + "\n"
            for i in range(3)
        )
    )
    metrics = {}
    for where, extra in (("local", []), ("ray", RAY)):
        out = tmp_path / f"ret-{where}.npy"
        code, stdout, err = run_cli(["eval", "retrieval", str(data), "--out", str(out), *model, *extra], capsys)
        assert code == 0, err
        metrics[where] = json.loads(stdout)["runs"][0]["metrics"]
        assert np.load(out).shape[0] == 3 + 4
    assert metrics["ray"] == metrics["local"]


def test_eval_takes_the_ray_options(tmp_path, capsys) -> None:
    from vlmcli.cli.batch import ray_flag
    from vlmcli.cli.eval import sample_flag

    assert ray_flag(sample_flag(["eval", "vqa", "--sample", "--ray"])) == ["eval", "vqa", "--sample-set", "--ray=local"]
    assert ray_flag(["eval", "zeroshot", "--ray", "photos/", "--ray-workers", "2"])[2] == "--ray=local"
    assert ray_flag(["eval", "retrieval", "d.json", "--ray", "auto"])[3:] == ["--ray", "auto"]
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps({"image": "a.png", "question": "q", "answers": ["a"]}) + "\n")
    code, _, err = run_cli(["eval", "vqa", str(data), "--ray-cpus", "2"], capsys)
    assert code == 2 and "--ray-cpus goes with --ray" in err
    code, _, err = run_cli(["eval", "vqa", str(data), "--predictions", str(data), "--ray"], capsys)
    assert code == 2 and "--predictions scores without a model" in err and err.count("\n") == 1


def test_eval_caption_best_of_rows_on_ray_equal_local(tmp_path, smolvlm2_gguf, capsys) -> None:
    # A row per N from one model load per worker (the N=2 task derived on the actors); sampling is seeded.
    model = [
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "--threads",
        "1",
        "-n",
        "3",
        "--quiet",
        "--json",
        "--sample",
        "2",
        "--best-of",
        "1,2",
        "--detail",
        "low",
    ]
    runs = {}
    for where, extra in (("local", []), ("ray", RAY)):
        out = tmp_path / f"{where}.jsonl"
        code, stdout, err = run_cli(["eval", "caption", "--out", str(out), *model, *extra], capsys)
        assert code == 0, err
        runs[where] = json.loads(stdout)["runs"]
        assert [r["best_of"] for r in runs[where]] == [1, 2] and len(jsonl(out)) == 4
    for a, b in zip(runs["local"], runs["ray"], strict=True):
        assert a["metrics"] == b["metrics"] and a["items"] == b["items"] == 2
    assert _without_timings(jsonl(tmp_path / "local.jsonl")) == _without_timings(jsonl(tmp_path / "ray.jsonl"))
