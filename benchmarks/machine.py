"""What the benchmark results record about the machine, and how a result file is written and shown."""
import argparse
import json
import platform
from typing import Callable, Optional


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def show_report(path: str, render: Callable[[dict], str]) -> int:
    """Print the table of the result file at ``path``; exit status 0."""
    with open(path) as f:
        print(render(json.load(f)))
    return 0


def publish(data: dict, out: Optional[str], render: Callable[[dict], str]) -> int:
    """Print ``data``'s table and write it to ``out`` (JSON) when given; exit status 0."""
    print(render(data))
    if out:
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
        print("wrote", out)
    return 0


def video_parser(description: str) -> argparse.ArgumentParser:
    """The options of an end-to-end comparison on a video: --model, --frames, --budget, --threads, --video, --out,
    --report."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--video", default="bigbuckbunny")
    p.add_argument("--out")
    p.add_argument("--report", help="print the table of a result file")
    return p
