"""The matmul ceiling under CLIP ViT-B/32: GFLOPS of its matmul shapes, per kernel, on this CPU.

A ViT-B/32 image pass is almost all matmuls (8.7 GFLOP per image, below), so the rate at which a
kernel multiplies these shapes bounds the images/s of any engine built on it. Measured, each on the
same threads (medians of --runs calls after a warm-up):
- ggml's CPU mul_mat through vlm's own bindings (engines/ggml.py), weights F32, F16, BF16, Q8_0 and
  Q4_0 / IQ4_NL; the 4-bit ones also in ggml's CPU_REPACK buffer (its interleaved AVX2 / NEON
  kernels, what llama.cpp uses for them), with the cosine of each result to the F32 product;
- vlm's own kernels (engines/clip_kernels.py: bf16 where the CPU has AVX512_BF16, i16 in its AVX2 form
  and, where the CPU has AVX512_VNNI, its 512-bit form) in the same graphs;
- numpy's sgemm (its BLAS, on --threads through OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS),
  and PyTorch's (torch.matmul) when --torch-python or this Python has it; each in a process of its own.
Shapes (k, m, n): the attention projections (768 -> 768), fc1 (768 -> 3072) and fc2 (3072 -> 768) of
a batch of 32 images (1600 tokens), and a text tower's fc1 (512 -> 2048) on 32 texts of 11 tokens.
The last lines turn the rates into images/s bounds: FLOP per image / GFLOPS, nothing else counted.

    python benchmarks/bench_matmul.py [--threads 2] [--runs 8] [--torch-python /tmp/torchenv/bin/python]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_clip import AVX2_ONLY, cosine, timed  # noqa: E402  (timed: median seconds after a warm-up)

SHAPES = {
    "q/k/v/out 768->768": (768, 768, 1600),
    "fc1 768->3072": (768, 3072, 1600),
    "fc2 3072->768": (3072, 768, 1600),
    "text fc1 512->2048": (512, 2048, 352),
}
GGML_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "IQ4_NL")
REPACKED = ("Q4_0", "IQ4_NL")


def vit_b32_flops_per_image() -> float:
    """Multiply-adds x 2 of one 224 px image: patch embedding, 12 blocks of 50 tokens, projection."""
    d, ffn, t, layers, heads = 768, 3072, 50, 12, 12
    per_block = 2 * t * (4 * d * d + 2 * d * ffn) + 2 * 2 * heads * t * t * (d // heads)
    return 2 * 49 * 3 * 32 * 32 * d + layers * per_block + 2 * d * 512


def repack_buffer_type() -> int | None:
    """ggml's CPU_REPACK buffer type (an "extra" buffer type of the CPU device), or None."""
    from vlmcli.engines import ggml

    L = ggml.lib()
    c = L.cdll
    c.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    c.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    c.ggml_backend_buft_name.restype = ctypes.c_char_p
    c.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    c.ggml_backend_alloc_ctx_tensors_from_buft.restype = ctypes.c_void_p  # used by ggml_rate
    c.ggml_backend_alloc_ctx_tensors_from_buft.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    dev = L.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    fn = c.ggml_backend_reg_get_proc_address(L.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    i = 0
    while bufts[i]:
        if b"REPACK" in c.ggml_backend_buft_name(bufts[i]):
            return bufts[i]
        i += 1
    return None


def ggml_rate(
    qtype: str,
    k: int,
    m: int,
    n: int,
    threads: int,
    runs: int,
    buft: int | None,
    form: str | None = None,
) -> tuple[float, float]:
    """(GFLOPS, cosine to the F32 product) of W [m, k] (qtype) times X [k, n] through ggml's mul_mat,
    or through vlm's kernel of that form (qtype BF16 for bf16, F16 for the i16 forms, which quantize the
    F16 values) in the same graph machinery."""
    from vlmcli.engines import clip_kernels, ggml
    from vlmcli.engines.ggml import Backend, Graph

    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((n, k)).astype(np.float32)
    backend = Backend(n_threads=threads)
    with Graph(max_tensors=2) as weights, Graph(max_tensors=8, graph_size=16) as g:
        w = weights.new_tensor(qtype, (k, m), "w")
        if buft is None:
            backend.alloc_tensors(weights)
        else:
            backend.buffers.append(ggml.lib().cdll.ggml_backend_alloc_ctx_tensors_from_buft(weights.ctx, buft))
        if qtype == "F32":
            raw = w32
        elif qtype == "F16":
            raw = w32.astype(np.float16)
        else:
            raw = ggml.quantize(w32, qtype)  # BF16 too, rounded to nearest even as vlm's bf16 packing rounds
        xin = g.input("F32", (k, n), "x")
        if form:  # vlm's own kernel (engines/clip_kernels.py)
            values = raw.view(np.uint16).reshape(m, k) if form == "bf16" else raw.reshape(m, k)  # i16: F16 values
            y = g.output(clip_kernels.linear(g, xin, clip_kernels.pack(values, form)))
        else:
            backend.set(w, raw)
            y = g.output(g.mul_mat(w, xin))
        backend.allocate(g)
        backend.set(xin, x)
        seconds = timed(lambda: backend.compute(g), runs)
        got, ref = backend.get(y, 2).ravel(), (x @ w32.T).ravel()
    backend.close()
    return 2 * k * m * n / seconds / 1e9, float(cosine(got, ref))


def sgemm_rates(runs: int, torch: bool, threads: int) -> dict[str, float]:
    """sgemm GFLOPS per shape: numpy's BLAS, or torch.matmul (run in the torch Python)."""
    if torch:
        import torch as th

        th.set_num_threads(threads)
    rates = {}
    for name, (k, m, n) in SHAPES.items():
        a = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
        b = np.random.default_rng(2).standard_normal((k, m)).astype(np.float32)
        if torch:
            ta, tb = th.from_numpy(a), th.from_numpy(b)
            rates[name] = 2 * k * m * n / timed(lambda ta=ta, tb=tb: th.matmul(ta, tb), runs) / 1e9
        else:
            rates[name] = 2 * k * m * n / timed(lambda a=a, b=b: a @ b, runs) / 1e9
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--torch-python", default=None)
    ap.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: PyTorch held to AVX2 and no BF16 rows (bench_clip.AVX2_ONLY: a proxy for an AVX2-only CPU)",
    )
    ap.add_argument("--sgemm-worker", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sgemm_worker:
        print(json.dumps(sgemm_rates(args.runs, args.sgemm_worker == "torch", args.threads)))
        return 0
    from machine import cpu_description
    from report import print_table

    rows: dict[str, dict[str, float]] = {}
    cosines: dict[str, float] = {}
    buft = repack_buffer_type()
    for qtype in GGML_TYPES:
        for repacked in (False, True) if qtype in REPACKED and buft else (False,):
            label = f"ggml {qtype}{' repacked' if repacked else ''}"
            print(f"{label} ...", file=sys.stderr)
            results = {
                name: ggml_rate(qtype, *shape, args.threads, args.runs, buft if repacked else None)
                for name, shape in SHAPES.items()
            }
            rows[label] = {name: r[0] for name, r in results.items()}
            cosines[label] = min(r[1] for r in results.values())
    from vlmcli.engines import clip_kernels

    for form, spec in clip_kernels.FORMS.items():
        if clip_kernels.available(form) and (form == "i16-avx2" or args.isa == "native"):
            label = f"vlm {form} kernel ({spec.isa})"
            print(f"{label} ...", file=sys.stderr)
            qtype = "BF16" if form == "bf16" else "F16"
            results = {
                name: ggml_rate(qtype, *shape, args.threads, args.runs, None, form) for name, shape in SHAPES.items()
            }
            rows[label] = {name: r[0] for name, r in results.items()}
            cosines[label] = min(r[1] for r in results.values())
    threads = {var: str(args.threads) for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for label, worker, python in (
        ("numpy sgemm", "numpy", sys.executable),
        ("torch.matmul", "torch", args.torch_python or sys.executable),
    ):
        done = subprocess.run(
            [python, __file__, "--sgemm-worker", worker, "--runs", str(args.runs), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            env={**os.environ, **threads, **(AVX2_ONLY if args.isa == "avx2" else {})},
        )
        if done.returncode == 0:
            rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            print(f"{label} failed in {python}: its row is left out", file=sys.stderr)

    flops = vit_b32_flops_per_image()
    table = []
    for label, rates in rows.items():
        vision = [rates[name] for name in list(SHAPES)[:3]]
        # the three vision shapes weighted by their FLOPs in a block (4 : 4 : 4 x 768^2 units)
        bound = 1 / ((1 / 3) / vision[0] + (1 / 3) / vision[1] + (1 / 3) / vision[2]) * 1e9 / flops
        cos = f"{cosines[label]:.5f}" if label in cosines else "-"
        table.append([label, *(f"{rates[name]:.1f}" for name in SHAPES), cos, f"{bound:.1f}"])
    print_table(
        "Matmul kernels on ViT-B/32's shapes" + (", AVX2 proxy" if args.isa == "avx2" else ""),
        ["kernel, GFLOPS", *SHAPES, "cosine to F32", "images/s bound"],
        table,
        note=("torch held to AVX2; " if args.isa == "avx2" else "") + f"{args.threads} threads, medians of {args.runs}",
        footer=f"(ViT-B/32: {flops / 1e9:.2f} GFLOP per image; images/s bound: that FLOP count at the kernel's "
        f"rate on the vision shapes, every other op free)",
    )
    out = ROOT / "benchmarks" / "out" / f"bench_matmul-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "cpu": cpu_description(),
                "isa": args.isa,
                "threads": args.threads,
                "runs": args.runs,
                "flops_per_image": flops,
                "gflops": rows,
                "cosine_to_f32": cosines,
            },
            indent=2,
        )
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
