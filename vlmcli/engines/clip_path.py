"""Which code runs CLIP's matmuls and attention for a device and a file: the one place that decides.

Two families:
- ggml's own ops, on the weights as the file stores them: GPU devices, CPUs vlm's kernels do not run
  on (not x86-64, no AVX2, or vlm installed without a C compiler), and files whose matmul weights are
  all of a quantized type the kernels do not take (Q4_0, Q5_1, ...: chosen for size, which 16-bit
  packing would undo);
- vlm's kernels (engines/clip_kernels.py), in the form the CPU runs best: bf16 where it has
  AVX512_BF16, else i16 in its AVX512_VNNI form, else in its AVX2 form. Integer and BF16 dot products
  do twice the multiply-adds of an F32 FMA per instruction, and the kernels beat ggml's mul_mat on
  every x86 CPU measured (docs/performance.md). They take F16, F32 and Q8_0 weights: a Q8_0 value is
  an 8-bit integer times an F16 scale, which BF16 and I16 hold to within their own rounding.

VLM_CLIP_KERNELS overrides the choice on the CPU, for debugging and benchmarks: ggml, bf16, i16-vnni or
i16-avx2 (auto, or unset: the choice above). Asking for a form the CPU lacks is an error; GPU devices
always run ggml.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from vlmcli.engines import clip_kernels
from vlmcli.errors import VlmError

KERNELS_ENV = "VLM_CLIP_KERNELS"
BEST_FIRST = ("bf16", "i16-vnni", "i16-avx2")  # vlm's forms (clip_kernels.FORMS), the preferred first
CHOICES = ("auto", "ggml", *BEST_FIRST)
PACKED_FROM = ("F16", "F32", "Q8_0")  # the file types vlm's kernels take


@dataclass(frozen=True)
class ClipPath:
    """What runs a loaded model's matmuls: form None for ggml's ops, else one of vlm's kernel forms."""

    form: str | None = None

    @property
    def family(self) -> str:
        return "ggml" if self.form is None else "vlm"

    def describe(self) -> str:
        """How `vlm doctor` names it."""
        if self.form is None:
            return "ggml"
        spec = clip_kernels.FORMS[self.form]
        return f"vlm's {spec.packing.upper()} kernels ({spec.isa})"


GGML = ClipPath()


def requested() -> str:
    """VLM_CLIP_KERNELS, checked: one of CHOICES."""
    choice = (os.environ.get(KERNELS_ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise VlmError(f"unknown {KERNELS_ENV} {choice!r}; use one of {', '.join(CHOICES)}")
    return choice


def choose_path(on_cpu: bool, matmul_types: Iterable[str] = ("F16",)) -> ClipPath:
    """The path for a model on a device (on_cpu: a CPU backend) whose matmul weights have these file
    types. Raises VlmError for a bad VLM_CLIP_KERNELS or a form this CPU does not run."""
    choice = requested()
    if not on_cpu or choice == "ggml":
        return GGML
    if choice != "auto" and not clip_kernels.available(choice):
        raise VlmError(
            f"{KERNELS_ENV}={choice} needs vlm's {choice} kernels, which this machine lacks (an x86-64 CPU "
            f"with {clip_kernels.FORMS[choice].isa}, and a C compiler when vlm was installed)"
        )
    if not any(t in PACKED_FROM for t in matmul_types):
        return GGML
    if choice != "auto":
        return ClipPath(choice)
    return next((ClipPath(form) for form in BEST_FIRST if clip_kernels.available(form)), GGML)
