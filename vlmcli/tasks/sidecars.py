"""IMAGE.txt next to each image (photo.jpg -> photo.txt), as captioning tools write them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Sidecars:
    overwrite: bool = False
    suffix: str = ".txt"
    written: dict[str, str] = field(default_factory=dict)  # sidecar -> image, in this run

    def path_for(self, image: str) -> str:
        return os.path.splitext(image)[0] + self.suffix

    def blocks(self, image: str) -> bool:
        """True when the image should be skipped: its sidecar exists and --overwrite was not given."""
        return not self.overwrite and os.path.exists(self.path_for(image))

    def write(self, image: str, text: str) -> str | None:
        """Write the sidecar atomically; returns an error message instead of clobbering."""
        target = self.path_for(image)
        other = self.written.get(os.path.abspath(target))
        if other is not None and other != os.path.abspath(image):
            return f"sidecar {target} was already written for {other} in this run (same name, other extension)"
        if not self.overwrite and os.path.exists(target):
            return f"sidecar {target} exists (pass --overwrite to replace it)"
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text.strip() + "\n")
            os.replace(tmp, target)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return f"cannot write sidecar {target} ({e.strerror})"
        self.written[os.path.abspath(target)] = os.path.abspath(image)
        return None
