"""Writes one benchmark's section of bench/RESULTS.md, between its markers, leaving the rest of the file as is."""

import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(name: str, text: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = open(PATH).read() if os.path.exists(PATH) else "# Benchmark results\n"
    if start not in old:
        old += f"\n{start}\n{end}\n"
    before, rest = old.split(start, 1)
    with open(PATH, "w") as f:
        f.write(before + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
