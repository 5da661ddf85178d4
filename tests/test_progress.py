"""progress.library_output: a library's tqdm bars drive orthoedit's progress, its other prints
go to the log, and orthoedit's own rich output still reaches the terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from tqdm import tqdm

from orthoedit.progress import BAR, Progress, library_output


class Recorder(Progress):
    def __init__(self):
        self.steps: list[list] = []  # [name, total, advanced]

    def start(self, name, total):
        self.steps.append([name, total, 0])

    def advance(self, n=1):
        self.steps[-1][2] += n


def test_bars_drive_the_progress_and_text_goes_to_the_log(capsys):
    progress, lines = Recorder(), []
    with library_output(progress, lines.append):
        for _ in tqdm(range(180), desc="Running generate_until requests", mininterval=0):
            pass
        for _ in tqdm(range(7), mininterval=0):  # no description
            pass
        print("a library's note", file=sys.stderr)
        print("and one on stdout\nin two lines")
        sys.stderr.write("no newline at the end")
    assert progress.steps == [["Running generate_until requests", 180, 180], ["working", 7, 7]]
    assert lines == [
        "a library's note",
        "and one on stdout",
        "in two lines",
        "no newline at the end",
    ]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # nothing raw reached the terminal
    assert type(sys.stderr).__module__ != "orthoedit.progress"  # restored


def test_rich_output_passes_through_and_print_as_log_does_not_loop(capsys):
    console = Console(stderr=True, force_terminal=False)
    with library_output(None, print):  # ``print`` as the log writes back into the capture
        console.print("orthoedit's own line")
        print("a library line")
    captured = capsys.readouterr()
    assert "orthoedit's own line" in captured.err
    assert captured.err.count("a library line") == 1 and captured.out == ""  # logged once


def test_the_bar_pattern():
    samples = {
        "Running loglikelihood requests:  27%|##7       | 49/180 [00:00<00:00, 444.56it/s]": (
            "Running loglikelihood requests",
            "49",
            "180",
        ),
        "100%|██████████| 180/180 [00:00<00:00, 3568.59it/s]": (None, "180", "180"),
    }
    for text, (desc, n, total) in samples.items():
        match = BAR.match(text)
        assert match and (match["desc"], match["n"], match["total"]) == (desc, n, total)
    assert BAR.match("loaded 180 of 200 documents") is None
