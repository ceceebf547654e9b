"""The markdown table of a zdtm lab run: test x configuration, and the reason for each FAIL."""

from __future__ import annotations

from spfs.lab.zdtm.build import Manifest
from spfs.lab.zdtm.run import ConfigRun
from spfs.lab.zdtm.selection import group_of


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(runs: list[ConfigRun], manifest: Manifest, criu: str, note: str = "") -> str:
    configs = [r.config for r in runs]
    tests = list(dict.fromkeys(t for r in runs for t in r.results))
    lines = [f"zdtm static tests of CRIU {manifest.version} (Debian {manifest.suite} source), "
             f"run against the lab's CRIU {criu}, one container per configuration.", ""]
    if note:
        lines += [note, ""]
    lines += ["| group | test | " + " | ".join(configs) + " |",
              "|---|---|" + "---|" * len(configs)]
    notes: list[str] = []
    for t in tests:
        cells = []
        for r in runs:
            res = r.results.get(t)
            if res is None:
                cells.append("")
                continue
            if res.verdict == "PASS":
                cells.append("PASS")
                continue
            notes.append(f"{t} / {r.config}: {res.detail}")
            cells.append(f"{res.verdict} [{len(notes)}]")
        lines.append(f"| {group_of(t)} | {t} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in runs:
        summary = {v: sum(1 for x in r.results.values() if x.verdict == v)
                   for v in ("PASS", "FAIL", "N/A")}
        lines.append(f"- {r.config}: {summary['PASS']} PASS, {summary['FAIL']} FAIL, "
                     f"{summary['N/A']} N/A; dump {r.dump_seconds:.1f} s, restore "
                     f"{r.restore_seconds:.1f} s, whole run {r.seconds:.0f} s" +
                     (f"; container error: {_cell(r.error[-500:])}" if r.error else ""))
    if notes:
        lines += ["", "Reasons:", ""]
        lines += [f"{i}. {_cell(n)}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"
