"""The C library's vlm_ask_media: several images (a file and packed pixels), a video, no image at all,
streamed or not, each answer the one `vlm ask -i ... --json` gives for the same inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vlm.h"

static int print_piece(const char *piece, size_t len, void *user) {
    (void)user;
    fwrite(piece, 1, len, stdout);
    return 0;
}

int main(int argc, char **argv) {
    /* argv: model, image file, raw RGB file, width, height, video file */
    if (argc != 7) return 2;
    vlm_options o = VLM_OPTIONS_INIT;
    o.max_tokens = 6;
    vlm_handle h = vlm_open(argv[1], &o);
    if (h <= 0) { fprintf(stderr, "%s\n", vlm_last_error(h)); return 1; }
    int w = atoi(argv[4]), ht = atoi(argv[5]);
    FILE *f = fopen(argv[3], "rb");
    unsigned char *rgb = malloc((size_t)w * ht * 3);
    if (!f || fread(rgb, 1, (size_t)w * ht * 3, f) != (size_t)w * ht * 3) return 3;
    fclose(f);
    vlm_image two[2] = {{argv[2], NULL, 0, 0}, {NULL, rgb, w, ht}};
    vlm_image video = {argv[6], NULL, 0, 0};
    char out[4096];
    size_t needed = 0;
    vlm_status st = vlm_ask_media(h, two, 2, "What changed?", out, sizeof out, &needed, NULL, NULL);
    printf("two\t%d\t%s\n", st, st == VLM_OK ? out : vlm_last_error(h));
    st = vlm_ask_media(h, &video, 1, "What happens?", out, sizeof out, &needed, NULL, NULL);
    printf("video\t%d\t%s\n", st, st == VLM_OK ? out : vlm_last_error(h));
    st = vlm_ask_media(h, NULL, 0, "Say hi.", out, sizeof out, &needed, NULL, NULL);
    printf("none\t%d\t%s\n", st, st == VLM_OK ? out : vlm_last_error(h));
    printf("stream\t");
    st = vlm_ask_media(h, NULL, 0, "Say hi.", NULL, 0, NULL, print_piece, NULL);
    printf("\t%d\n", st);
    vlm_image missing = {"/nonexistent/cat.mp4", NULL, 0, 0};
    st = vlm_ask_media(h, &missing, 1, "?", out, sizeof out, &needed, NULL, NULL);
    printf("missing\t%d\t%s\n", st, vlm_last_error(h));
    st = vlm_ask_media(h, NULL, 1, "?", out, sizeof out, &needed, NULL, NULL);
    printf("null\t%d\t%s\n", st, vlm_last_error(h));
    vlm_close(h);
    free(rgb);
    return 0;
}
"""


@pytest.mark.skipif(CC is None, reason="no C compiler")
def test_ask_media_from_c(smolvlm2_folder, tmp_path: Path) -> None:
    pytest.importorskip("cffi")
    pytest.importorskip("av")
    from PIL import Image
    from test_video import write_video

    lib = tmp_path / "lib"
    build = subprocess.run([sys.executable, "-m", "vlmcli", "lib", "build", "--out", str(lib)], capture_output=True)
    assert build.returncode == 0, build.stderr
    src = tmp_path / "media.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "media"
    cc = [CC, "-std=c11", "-Wall", "-Wextra", "-Werror", str(src), f"-I{lib}", f"-L{lib}", "-lvlm", "-o", str(exe)]
    compiled = subprocess.run(cc, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    small = Image.open(SAMPLE).convert("RGB").resize((96, 64))
    png, raw = tmp_path / "small.png", tmp_path / "small.rgb"
    small.save(png)
    raw.write_bytes(small.tobytes())
    clip = write_video(tmp_path / "clip.mp4", frames=10, fps=5)
    model = smolvlm2_folder("model")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1"}
    env.update({k: os.environ[k] for k in ("VLM_CACHE_DIR", "VLM_CORES_DIR") if k in os.environ})
    r = subprocess.run(
        [str(exe), str(model), str(SAMPLE), str(raw), "96", "64", str(clip)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    lines = {line.split("\t")[0]: line.split("\t")[1:] for line in r.stdout.splitlines()}

    def cli(*args: str) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "vlmcli", "ask", *args, "--model", str(model), "-n", "6", "--json", "--ctx", "4096"],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["answers"][0]["answer"]

    assert lines["two"] == ["0", cli("-i", str(SAMPLE), "-i", str(png), "What changed?")]
    assert lines["video"] == ["0", cli(str(clip), "What happens?")]
    assert lines["none"] == ["0", cli("--no-image", "Say hi.")]
    assert lines["stream"][0].strip() == lines["none"][1] and lines["stream"][1] == "0"
    assert lines["missing"][0] == "-6" and "/nonexistent/cat.mp4" in lines["missing"][1]
    assert lines["null"][0] == "-1" and "media" in lines["null"][1]
