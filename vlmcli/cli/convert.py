"""Commands: convert (Hugging Face checkpoint -> GGUF), quantize (GGUF -> smaller GGUF)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcli.cli.app import app, info

_CONVERT_HELP = (
    "Convert a Hugging Face checkpoint folder to GGUF.\n\n"
    "SmolVLM2 gives two files, the language model and its vision projector, named like ggml-org's: "
    "NAME-QUANT.gguf and mmproj-NAME-MMPROJ_QUANT.gguf. CLIP gives one two-tower file. "
    "The written paths are printed on stdout, one per line."
)


@app.command(help=_CONVERT_HELP)
def convert(
    checkpoint_dir: Path = typer.Argument(
        ..., metavar="CHECKPOINT_DIR", help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)."
    ),
    out: Path = typer.Option(Path("."), "--out", "-o", help="Folder to write the GGUF file(s) to."),
    quant: str | None = typer.Option(
        None,
        "--quant",
        "-q",
        help="Model type. SmolVLM2: F16, Q8_0 (default), Q4_K_M, Q5_K_M. "
        "CLIP: F16 (default), F32, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0.",
    ),
    mmproj_quant: str | None = typer.Option(
        None, "--mmproj-quant", help="SmolVLM2 vision projector type: F16 (default) or Q8_0."
    ),
) -> None:
    from vlmcli.convert import SMOLVLM_ARCHITECTURES, checkpoint_architecture, convert_checkpoint

    arch = checkpoint_architecture(checkpoint_dir)  # fail fast (and name config.json) before any work
    if arch in SMOLVLM_ARCHITECTURES:
        from vlmcli.cli.progress import progress
        from vlmcli.convert.smolvlm2 import convert_smolvlm2

        info(f"converting {checkpoint_dir} ({arch})")
        with progress(None, "writing tensors") as bar:

            def on_tensor(i: int, n: int, name: str) -> None:
                if bar is not None:
                    part = "mmproj" if name.startswith(("v.", "mm.")) else "model"
                    bar.update(bar.task_ids[0], completed=i, total=n, description=f"writing {part}")

            result = convert_smolvlm2(
                checkpoint_dir, out, quant=quant or "Q8_0", mmproj_quant=mmproj_quant or "F16", on_tensor=on_tensor
            )
        paths = [result.model, result.mmproj]
    else:
        info(f"converting {checkpoint_dir} ({arch})")
        paths = convert_checkpoint(checkpoint_dir, out, quant, mmproj_quant=mmproj_quant)
    for p in paths:
        typer.echo(str(p))


@app.command(
    help="Quantize a language-model GGUF with llama.cpp's quantizer (F16, Q8_0, Q4_K_M, Q5_K_M). "
    "Prints the output path."
)
def quantize(
    src: Path = typer.Argument(..., metavar="SRC.gguf", help="Input language-model GGUF (e.g. NAME-F16.gguf)."),
    dst: Path = typer.Argument(..., metavar="DST.gguf", help="Output GGUF path."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q", help="Target type: F16, Q8_0, Q4_K_M, Q5_K_M."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="Threads for quantizing (default: all cores)."),
) -> None:
    from vlmcli.convert.quantize import check_quant_name, quantize_gguf

    q = check_quant_name(quant)
    info(f"quantizing {src} to {q}")
    typer.echo(str(quantize_gguf(src, dst, q, n_threads=threads)))
