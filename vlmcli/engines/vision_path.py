"""What encodes SmolVLM2's images: the one place that decides, beside clip_path.choose_path for CLIP.

- vlm's kernels (engines/siglip.py: the SigLIP encoder and connector on the ViT runner CLIP uses), in
  the i16 form the CPU runs best (i16-vnni where AVX512_VNNI is, else i16-avx2), on x86-64 CPUs where
  they were built and the projector fits them (an idefics3 mmproj with F16, F32, BF16 or Q8_0 weights);
- mtmd's own encoder (llama.cpp's clip.cpp on ggml) everywhere else: GPU devices, other CPUs, other
  projectors.

VLM_VISION_KERNELS overrides the choice on the CPU: mtmd (mtmd's encoder everywhere), bf16, i16-vnni
or i16-avx2 (auto, or unset: the choice above). Asking for a form the CPU lacks is an error; GPU
devices always run mtmd's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vlmcli.engines import clip_kernels, siglip
from vlmcli.engines.clip_path import BEST_FIRST
from vlmcli.errors import VlmError
from vlmcli.gguf.reader import GgufInfo

KERNELS_ENV = "VLM_VISION_KERNELS"
CHOICES = ("auto", "mtmd", *BEST_FIRST)
# The forms auto picks, best first: the i16 forms, whose embeddings and greedy answers have been
# checked against mtmd's on CPUs that run them, and whose attention runs on the 16-bit tiles too. bf16
# rounds about ten times further from mtmd and runs when asked for by name (the CPUs with AVX512_BF16
# have VNNI as well).
AUTO_FORMS = ("i16-vnni", "i16-avx2")


@dataclass(frozen=True)
class VisionPath:
    """What runs SmolVLM2's vision encoder: form None for mtmd's, else one of vlm's kernel forms."""

    form: str | None = None
    reason: str = ""  # why mtmd's, where vlm's kernels could not run

    @property
    def family(self) -> str:
        return "mtmd" if self.form is None else "vlm"

    def describe(self) -> str:
        """How `vlm doctor` names it."""
        if self.form is None:
            return "mtmd" + (f" ({self.reason})" if self.reason else "")
        spec = clip_kernels.FORMS[self.form]
        return f"vlm's {spec.packing.upper()} kernels ({spec.isa})"


def requested() -> str:
    """VLM_VISION_KERNELS, checked: one of CHOICES."""
    choice = (os.environ.get(KERNELS_ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise VlmError(f"unknown {KERNELS_ENV} {choice!r}; use one of {', '.join(CHOICES)}")
    return choice


def best_form() -> str | None:
    """The form of vlm's kernels auto runs on this CPU (VLM_VISION_KERNELS aside), or None."""
    return next((form for form in AUTO_FORMS if clip_kernels.available(form)), None)


def choose_vision_path(on_cpu: bool, mmproj: GgufInfo | None = None) -> VisionPath:
    """The encoder for a projector (mmproj None: any projector vlm's kernels take) on a device (on_cpu:
    the language model and projector run on the CPU). Raises VlmError for a bad VLM_VISION_KERNELS or
    a form this CPU does not run."""
    choice = requested()
    if not on_cpu:
        return VisionPath(None, "GPU")
    if choice == "mtmd":
        return VisionPath(None, f"{KERNELS_ENV}=mtmd")
    if choice != "auto" and not clip_kernels.available(choice):
        raise VlmError(
            f"{KERNELS_ENV}={choice} needs vlm's {choice} kernels, which this machine lacks (an x86-64 CPU "
            f"with {clip_kernels.FORMS[choice].isa}, and a C compiler when vlm was installed)"
        )
    form = choice if choice != "auto" else best_form()
    return VisionPath(None, "no vlm kernels on this CPU") if form is None else kernels_path(form, mmproj)


def kernels_path(form: str, mmproj: GgufInfo | None = None) -> VisionPath:
    """vlm's kernels in `form`, one this CPU runs, for a projector (None: any they take), or mtmd's encoder
    and why where they cannot run it."""
    if not clip_kernels.attention_available():
        return VisionPath(None, "no vlm kernels on this CPU")
    why = siglip.unsupported(mmproj, form) if mmproj is not None else None
    return VisionPath(None, why) if why else VisionPath(form)
