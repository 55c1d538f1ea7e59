"""Command: serve (an OpenAI-compatible HTTP server over worker processes; vlmcli/serve/)."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from vlmcli.cli.app import CtxOpt, GpuOpt, MaxPixelsOpt, app, info
from vlmcli.errors import EXIT_USAGE, VlmError


@app.command()
def serve(
    models: list[str] = typer.Option(
        ...,
        "--model",
        "-m",
        help="A model to serve (store name, GGUF file or folder); repeat for a SmolVLM2 and a CLIP.",
    ),
    mmproj: str | None = typer.Option(
        None, "--mmproj", help="Vision projector GGUF, when the SmolVLM2 --model is a GGUF file."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535),
    workers: int = typer.Option(
        1, "--workers", "-w", min=1, help="Worker processes per model, each holding the model."
    ),
    queue: int = typer.Option(16, "--queue", min=1, help="Requests waiting per model; more get 429."),
    timeout: float = typer.Option(
        300.0, "--timeout", min=0.1, help="Seconds a request may take, queueing included (then 504)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        "-t",
        min=1,
        help="CPU threads per worker (default: each request takes its share of the cores with the work running then).",
    ),
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: str | None = typer.Option(None, "--detail", help="Image detail: low, high, auto."),
    max_tiles: int | None = typer.Option(None, "--max-tiles", min=0),
    max_n: int = typer.Option(4, "--max-n", min=1, help="Largest `n` (best-of candidates) a chat request may ask for."),
    max_pixels: int = MaxPixelsOpt,
    max_body: int = typer.Option(
        32 * 1024 * 1024, "--max-body", min=1024, help="Largest request body in bytes (then 413)."
    ),
    allow_files: Path | None = typer.Option(
        None, "--allow-files", help="Let image_url name local files under this folder."
    ),
    allow_remote_images: bool = typer.Option(
        False,
        "--allow-remote-images",
        help="Fetch http(s) image URLs clients name (any address this host can reach: for trusted clients).",
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="VLM_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/ (also VLM_API_KEY)."
    ),
    offline: bool = typer.Option(False, "--offline", help="Use only models already in the store."),
    index: Path | None = typer.Option(
        None, "--index", help="A photo index (`vlm index --db FILE`) for POST /v1/search, with a CLIP --model."
    ),
) -> None:
    """Serve the OpenAI API (chat completions with images, embeddings) from worker processes that survive crashes."""
    try:
        import uvicorn

        from vlmcli.serve.app import ServeConfig, create_app
    except ImportError as e:
        raise VlmError(
            f"vlm serve needs the serve extra: pip install 'vlmcli[serve]' ({e})", exit_code=EXIT_USAGE
        ) from None
    from vlmcli.serve.workers import ModelPool, WorkerSpec
    from vlmcli.tasks.models import detect_kind

    if allow_files is not None and not allow_files.is_dir():
        raise VlmError("--allow-files must be a folder", allow_files, exit_code=EXIT_USAGE)
    specs: list[WorkerSpec] = []
    for m in models:
        kind = detect_kind(m) or "vlm"
        name = _model_id(m)
        if any(s.name == name for s in specs):
            raise VlmError(f"--model {m} is given twice", exit_code=EXIT_USAGE)
        specs.append(
            WorkerSpec(
                model=m,
                kind=kind,
                name=name,
                mmproj=mmproj if kind == "vlm" else None,
                # None: each worker takes its share of the cores per request (engines/cores.py)
                n_threads=threads,
                n_gpu_layers=n_gpu_layers,
                n_ctx=ctx,
                detail=detail,
                max_tiles=max_tiles,
                max_n=max_n,
                max_pixels=max_pixels,
                offline=offline,
            )
        )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        info(f"vlm: warning: serving on {host} without --api-key: anyone who can reach it can use it")
    pools: dict[str, ModelPool] = {}
    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again: exit through
    # `finally` (stopping the workers) instead of dying of it.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for spec in specs:
            each = f"{threads} thread(s) each" if threads else "sharing the cores per request"
            info(f"vlm: loading {spec.name} ({spec.kind}) in {workers} worker(s), {each}")
            pool = ModelPool(spec, workers, queue)
            pool.start()
            pools[spec.name] = pool
        config = ServeConfig(
            pools,
            timeout=timeout,
            max_body=max_body,
            allow_files=allow_files,
            allow_remote_images=allow_remote_images,
            api_key=api_key,
            index=index,
        )
        info(f"vlm: serving {', '.join(pools)} on http://{host}:{port}")
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    except RuntimeError as e:
        raise VlmError(f"cannot start the workers: {e}") from None
    finally:
        for pool in pools.values():
            pool.close()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _model_id(model: str) -> str:
    """The id clients name: the store name, or a file's or folder's name."""
    p = Path(model).expanduser()
    if p.is_file():
        return p.stem
    if p.is_dir():
        return p.resolve().name
    return model
