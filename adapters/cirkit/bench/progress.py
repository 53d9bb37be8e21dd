"""The one progress display of the benchmark harness (training epochs, sweep steps)."""

from __future__ import annotations

import sys
from typing import Optional


class Progress:
    """A tqdm bar when tqdm is importable; otherwise plain lines on stderr.

    ``step(info)`` advances by one and shows ``info`` beside the bar; without tqdm it
    prints ``[i/total] info`` when ``echo_steps`` (the sweep's coarse steps) and nothing
    otherwise (training's many mini-batches). ``close(summary)`` ends the bar and prints
    ``desc: summary`` when a summary is given. Silent when ``enabled`` is False.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, echo_steps: bool = False,
                 leave: bool = False) -> None:
        self.enabled, self.desc, self.total, self.echo_steps = enabled, desc, total, echo_steps
        self.done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is in the bench extra; plain lines without it
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=leave, file=sys.stderr)

    def step(self, info: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(info)
            self.bar.update(1)
        elif self.enabled and self.echo_steps:
            print(f"[{self.done}/{self.total}] {info}", file=sys.stderr, flush=True)

    def close(self, summary: Optional[str] = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled and summary:
            print(f"{self.desc}: {summary}", file=sys.stderr, flush=True)
