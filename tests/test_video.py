"""Video: frames sampled and laid out as transformers' SmolVLM processor does, decoded with PyAV.

transformers' video processor needs torchvision, which does not load beside this machine's CPU torch, so
its sampling rule (video_processing_smolvlm.py, SmolVLMVideoProcessor.sample_frames) is ported here as
the reference, and the prompt text around the frames from processing_smolvlm.py (process_video). Tests
write their own tiny videos with PyAV.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jinja2
import numpy as np
import pytest
from fixtures.smolvlm2 import IMAGE_TOKEN_ID

from vlmcli.engines.encoding_cache import EncodingCache
from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.errors import ImageError
from vlmcli.tasks.video import Sampling, load_video, parse_duration, probe, sample_indices, segments

av = pytest.importorskip("av")  # PyAV writes the test videos (and vlm reads them with it)

WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 6: "six"}  # num2words for the counts used here


def write_video(path: Path, frames: int, fps: int, size: int = 64) -> Path:
    """A video whose frame i is a flat grey of level 8 * i (so a decoded frame tells its index)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless, so that a frame's grey level tells its index
        for i in range(frames):
            pixels = np.full((size, size, 3), 8 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def reference_indices(total: int, video_fps: float, fps: float, max_frames: int, skip_secs: float = 1) -> list[int]:
    """SmolVLMVideoProcessor.sample_frames, with the metadata transformers reads (duration = frames / fps)."""
    duration = total / video_fps
    desired = max(1, min(int(round(fps * duration)), max_frames))
    start, end = 0, total - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start, end = int(skip_secs * video_fps), int(total - skip_secs * video_fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return [int(i) for i in np.unique(np.linspace(start, end, desired, dtype=int))]


def reference_prompt(template: str, question: str, indices: list[int], video_fps: float, total: int, n: int) -> str:
    """The chat template with a video part, `<video>` expanded as SmolVLMProcessor.process_video does."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    content = [{"type": "video"}, {"type": "text", "text": question}]
    text = env.from_string(template).render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)
    duration = timedelta(seconds=int(total / video_fps))
    count = WORDS[len(indices)]
    video = f"You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
    for i in indices:
        second = i / video_fps
        video += f"\nFrame from {int(second // 60):02d}:{int(second % 60):02d}:"
        video += f"<fake_token_around_image><global-img>{'<image>' * n}<fake_token_around_image>"
    return text.replace("<video>", video + "\n\n", 1)


@pytest.mark.parametrize(
    "total, video_fps, fps, max_frames",
    [(15, 5, 1, 64), (240, 24, 1, 64), (7200, 30, 1, 64), (24, 2, 1, 4), (30, 30, 1, 64), (1, 25, 1, 64)]
    + [(600, 10, 2, 8)],
)
def test_sampling_follows_the_processor(total: int, video_fps: float, fps: float, max_frames: int) -> None:
    assert sample_indices(total, video_fps, total / video_fps, fps, max_frames) == reference_indices(
        total, video_fps, fps, max_frames
    )


@pytest.fixture(scope="module")
def engine(smolvlm2_gguf):
    with VlmEngine(
        smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(n_ctx=4096, n_threads=2, detail="high")
    ) as e:
        yield e


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=15, fps=5)


def test_a_video_is_laid_out_as_the_processor_does(engine, clip: Path) -> None:
    video = load_video(str(clip), engine.vision.tile_size)
    indices = reference_indices(15, 5, 1, 64)
    assert [round(t * 5) for t in video.timestamps] == indices == [0, 7, 14]
    assert (video.duration, video.width, video.height) == (3.0, 64, 64)
    assert all(f.size == (engine.vision.tile_size,) * 2 for f in video.frames)  # squared, unsplit
    levels = [float(np.asarray(f).mean()) for f in video.frames]
    assert levels == pytest.approx([8 * i for i in indices], abs=3)  # the frames at those indices
    want = reference_prompt(engine.chat_template, "What happens?", indices, 5, 15, engine.vision.tokens_per_tile)
    ids = engine.layout(video, "What happens?")
    assert ids == engine.tokenize(want)
    assert ids.count(IMAGE_TOKEN_ID) == 3 * engine.vision.tokens_per_tile


def test_frames_and_images_mix_in_one_prompt(engine, clip: Path) -> None:
    from vlmcli.images import load_image

    photo = load_image(Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg")
    video = load_video(str(clip), engine.vision.tile_size)
    g = next(engine.ask([photo, video], ["Is the cat in the video?"], GenerationOptions(max_tokens=2)))
    assert [e.detail for e in g.media] == ["high", "video"]
    assert g.media[1].image_tokens == 3 * engine.vision.tokens_per_tile
    assert g.prompt_tokens == len(engine.layout([photo, video], "Is the cat in the video?"))


def test_long_videos_skip_their_first_and_last_second(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", frames=24, fps=2)
    video = load_video(str(path), 32, Sampling(fps=1, max_frames=4))
    assert [round(t * 2) for t in video.timestamps] == reference_indices(24, 2, 1, 4) == [2, 8, 15, 22]
    assert [float(np.asarray(f).mean()) for f in video.frames] == pytest.approx([16, 64, 120, 176], abs=3)


def test_fps_and_max_frames_override_the_sampling(clip: Path) -> None:
    assert len(load_video(str(clip), 32, Sampling(fps=2)).frames) == 6
    assert len(load_video(str(clip), 32, Sampling(fps=5, max_frames=4)).frames) == 4


def test_segments_cover_the_video(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", frames=24, fps=2)  # 12 s
    assert segments(str(path), parse_duration("5s")) == [(0.0, 5.0), (5.0, 10.0), (10.0, 12.0)]
    part = load_video(str(path), 32, Sampling(), start=5.0, end=10.0)
    assert part.duration == 5.0 and part.timestamps[0] == 0.0  # times within the segment
    assert float(np.asarray(part.frames[0]).mean()) == pytest.approx(8 * 10, abs=3)  # frame 10 = 5 s
    assert [parse_duration(s) for s in ("30s", "2m", "1h", "90", "1:30")] == [30, 120, 3600, 90, 90]


def test_a_second_question_on_a_video_skips_the_encoder(smolvlm2_gguf, clip: Path, tmp_path: Path) -> None:
    opts = EngineOptions(n_ctx=4096, n_threads=2, cache=EncodingCache(tmp_path))
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, opts) as e:
        short = GenerationOptions(max_tokens=2)
        first = next(e.ask(load_video(str(clip), e.vision.tile_size), ["What happens?"], short))
        again = next(e.ask(load_video(str(clip), e.vision.tile_size), ["Who is there?"], short))
    assert first.image.encoder_passes == 3
    assert (again.image.encoder_passes, again.timings.image_encode_ms, again.image.cached) == (0, 0.0, "kv")


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_bad_videos_give_one_clear_error(clip: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    truncated = tmp_path / "truncated.mp4"  # its index (moov) is lost with the end
    truncated.write_bytes(clip.read_bytes()[:600])
    cut = write_video(tmp_path / "clip.mkv", frames=15, fps=5).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(cut[: len(cut) // 2])  # streamable: decodes up to the cut
    cases = {
        garbage: "cannot read this video",
        _audio_only(tmp_path / "audio.wav"): "no video stream",
        truncated: "cannot read this video",
        tmp_path / "cut.mkv": r"breaks off at \d\.\d s of its 3\.0 s \(truncated\?\)",
    }
    for path, why in cases.items():
        with pytest.raises(ImageError, match=why) as e:
            load_video(str(path), 32)
        assert e.value.path == str(path)
    with pytest.raises(ImageError, match="no video stream"):
        probe(str(tmp_path / "audio.wav"))


def test_folders_give_their_videos_to_ask_and_caption(clip: Path, tmp_path: Path) -> None:
    import shutil

    from vlmcli.tasks.inputs import InputSpec, expand_inputs

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg", folder / "a.jpg")
    shutil.copy(clip, folder / "b.mp4")
    shutil.copy(clip, folder / "c.bin")  # a video by its content
    write_video(folder / "d.mkv", frames=2, fps=2)
    (folder / "e.txt").write_text("not media")

    def names(spec: InputSpec) -> list[str]:
        return [Path(p).name for p in expand_inputs(spec).paths]

    assert names(InputSpec([str(folder)], videos=True)) == ["a.jpg", "b.mp4", "c.bin", "d.mkv"]
    assert names(InputSpec([str(folder)])) == ["a.jpg"]  # CLIP's commands: images only
