"""The markdown table of a zdtm lab run: test x configuration, and the reason for each FAIL."""

from __future__ import annotations

import re
from pathlib import Path

from spfs.lab.zdtm.build import Manifest
from spfs.lab.zdtm.run import ConfigRun, Result
from spfs.lab.zdtm.selection import group_of

BEGIN = "<!-- zdtm-table:begin (spfs-lab zdtm table --readme README.md) -->"
END = "<!-- zdtm-table:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def shown(run: ConfigRun, test: str, control: ConfigRun | None) -> Result | None:
    """A test that fails on NFS with no migration at all (the nocr control) is not
    applicable to an NFS configuration: its FAIL there says nothing about the migration."""
    res = run.results.get(test)
    if res is None or control is None or run is control or run.config == "baseline":
        return res
    ctl = control.results.get(test)
    if res.verdict == "FAIL" and ctl is not None and ctl.verdict == "FAIL":
        return Result(test, "N/A", f"fails on NFS without migration ({control.config}): "
                      f"{ctl.detail}")
    return res


def markdown(runs: list[ConfigRun], manifest: Manifest, criu: str) -> str:
    control = next((r for r in runs if r.config.endswith("-nocr")), None)
    configs = [r.config for r in runs]
    tests = list(dict.fromkeys(t for r in runs for t in r.results))
    lines = [f"zdtm static tests of CRIU {manifest.version} (Debian {manifest.suite} source, "
             f"built in {manifest.seconds:.0f} s), run against the lab's CRIU {criu}, all "
             "tests of a configuration in one container, dumped and restored once.", ""]
    lines += ["| group | test | " + " | ".join(configs) + " |",
              "|---|---|" + "---|" * len(configs)]
    notes: list[str] = []
    for t in tests:
        cells = []
        for r in runs:
            res = shown(r, t, control)
            if res is None:
                cells.append("")
            elif res.verdict == "PASS":
                cells.append("PASS")
            else:
                notes.append(f"{t} / {r.config}: {res.detail}")
                cells.append(f"{res.verdict} [{len(notes)}]")
        lines.append(f"| {group_of(t)} | {t} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in runs:
        summary = {v: sum(1 for t in r.results if (x := shown(r, t, control)) and
                          x.verdict == v) for v in ("PASS", "FAIL", "N/A")}
        lines.append(f"- {r.config}: {summary['PASS']} PASS, {summary['FAIL']} FAIL, "
                     f"{summary['N/A']} N/A; dump {r.dump_seconds:.1f} s, restore "
                     f"{r.restore_seconds:.1f} s, whole run {r.seconds:.0f} s" +
                     (f"; container lost at {_cell(r.error[:300])}" if r.error else ""))
    if notes:
        lines += ["", "Reasons:", ""]
        lines += [f"{i}. {_cell(n)}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def put_in_readme(readme: Path, text: str) -> None:
    """Replace the block between the markers (which must be there) with `text`."""
    old = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(old):
        raise SystemExit(f"{readme}: no zdtm table markers ({BEGIN} ... {END})")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", old))
