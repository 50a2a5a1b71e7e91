"""What every benchmark section of RESULTS.md starts with, and how it gets there."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def header(title: str, script: str, argv: list[str] | None) -> str:
    """A section title, the exact command, the machine and the date."""
    command = " ".join([f"python benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"\n### {title}\n\nCommand: `{command}`  \nMachine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, {device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}; "
            f"date {datetime.date.today()}  \n")


def publish(text: str, write: bool) -> None:
    """Print the section; with ``write``, append it to benchmarks/RESULTS.md."""
    print(text)
    if write:
        with open(RESULTS, "a") as f:
            f.write(text)
