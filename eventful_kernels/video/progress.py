"""A progress bar: tqdm when installed (it comes with huggingface_hub, a timm dependency), else a plain one."""
from __future__ import annotations

import sys
import time


class _Plain:
    def __init__(self, total: int, desc: str, stream=sys.stderr, width: int = 30):
        self.total, self.desc, self.stream, self.width = total, desc, stream, width
        self.n = 0
        self.t0 = time.perf_counter()
        self._draw()

    def _draw(self) -> None:
        done = int(self.width * self.n / max(self.total, 1))
        el = time.perf_counter() - self.t0
        line = f"\r{self.desc} [{'#' * done}{'.' * (self.width - done)}] {self.n}/{self.total} {el:5.1f}s"
        self.stream.write(line)
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def progress(total: int, desc: str = "", enabled: bool = True):
    """Object with ``update()``, ``set_description()``, ``close()``."""
    if not enabled:
        return _Plain(total, desc, stream=_Null())
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True)
    except ImportError:
        return _Plain(total, desc)


class _Null:
    def write(self, _):
        pass

    def flush(self):
        pass
