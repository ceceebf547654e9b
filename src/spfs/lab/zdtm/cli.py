"""`spfs-lab zdtm build` (host: fetch CRIU's sources, build the tests) and `spfs-lab zdtm run`
(inside the lab guest: the tests in one container per configuration, a markdown table)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from spfs.lab.paths import CHECKOUT

log = logging.getLogger(__name__)

BUILD = CHECKOUT / "build"
# the zdtm sources the lab builds its tests from: trixie's 4.1.1 (bookworm's 3.17.1 orig
# tarball is used instead when it can be had, see `build`)
PREFERRED = ("bookworm", "trixie")
DEFAULT_CONFIGS = ("baseline", "nfs4.1", "nfs3", "nfs4.1-nocr")


def add_zdtm_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("zdtm", help="CRIU's zdtm static tests in the lab")
    z = p.add_subparsers(dest="zdtm_cmd", required=True)
    z.add_parser("build", help="fetch CRIU's sources through a private apt config and build "
                 "the selected zdtm tests statically (host; idempotent)")
    r = z.add_parser("run", help="run the tests the zdtm way (inside the lab guest)")
    r.add_argument("--config", action="append", choices=DEFAULT_CONFIGS,
                   help="default: all; nfs4.1-nocr is the control without dump/restore")
    r.add_argument("--test", action="append", help="default: every selected test")
    r.add_argument("--version", help="which CRIU's tests (default: the one built)")
    r.add_argument("--json", type=Path, help="write the results here (default: "
                   "$SPFS_LAB_RESULTS/zdtm.json, which the guest writes through to the host)")
    t = z.add_parser("table", help="the markdown table of a run's results (host); with "
                     "--readme, put it in README's zdtm section")
    t.add_argument("json", type=Path)
    t.add_argument("--readme", type=Path)
    return p


def built_version(version: str | None) -> str:
    from spfs.lab.zdtm.build import out_dir
    if version:
        return version
    for v in ("3.17.1", "4.1.1"):
        if (out_dir(BUILD, v) / "manifest.json").exists():
            return v
    raise SystemExit("spfs-lab zdtm: no zdtm tests built: run `make setup` on the host")


def _build() -> int:
    from spfs.lab.zdtm import build, source
    got = source.fetch_all(BUILD)
    made = 0
    for suite in PREFERRED:
        src = got[suite]
        if isinstance(src, source.CriuSource):
            build.build(src, BUILD)
            made += 1
    if not made:
        print("spfs-lab zdtm: no CRIU source could be fetched: " +
              "; ".join(f"{s}: {e}" for s, e in got.items()), file=sys.stderr)
        return 1
    return 0


def _criu_version() -> str:
    out = subprocess.run(["criu", "--version"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return out.stdout.strip() or "?"


def _run(args: argparse.Namespace) -> int:
    from spfs.lab.env import in_guest
    from spfs.lab.zdtm import run, table
    from spfs.lab.zdtm.build import Manifest, out_dir
    from spfs.lab.zdtm.selection import ALL
    if not in_guest():
        print("spfs-lab zdtm run: inside the lab guest only: "
              "spfs-lab run -- .venv/bin/spfs-lab zdtm run", file=sys.stderr)
        return 2
    version = built_version(args.version)
    manifest = Manifest.load(out_dir(BUILD, version) / "manifest.json")
    tests = args.test or ALL
    results = os.environ.get("SPFS_LAB_RESULTS")
    out = args.json or (Path(results) / "zdtm.json" if results else None)
    criu = _criu_version()
    runs = []
    for i, name in enumerate(args.config or DEFAULT_CONFIGS):
        config = run.CONFIGS[name]
        log.info("zdtm: configuration %s, %d tests", name, len(tests))
        r = run.run_config(config, manifest, out_dir(BUILD, version) / "bin", tests,
                           run.default_images(name), f"zdtm{i}")
        log.info("zdtm: %s done in %.0f s%s", name, r.seconds,
                 f" (error: {r.error})" if r.error else "")
        runs.append(r)
        if out:
            run.save(runs, out, version, criu)
    text = table.markdown(runs, manifest, criu)
    if out:
        out.with_suffix(".md").write_text(text)
        print(f"spfs-lab zdtm: results in {out}, table in {out.with_suffix('.md')}")
    # the summary only: the whole table, through the guest's console, is slow to stream
    print("\n".join(line for line in text.splitlines() if line.startswith("- ")))
    return 0


def _table(args: argparse.Namespace) -> int:
    from spfs.lab.zdtm import run, table
    from spfs.lab.zdtm.build import Manifest, out_dir
    runs, version, criu = run.load(args.json)
    text = table.markdown(runs, Manifest.load(out_dir(BUILD, version) / "manifest.json"), criu)
    if args.readme:
        table.put_in_readme(args.readme, text)
    else:
        print(text)
    return 0


def run_zdtm(args: argparse.Namespace) -> int:
    if args.zdtm_cmd == "build":
        return _build()
    if args.zdtm_cmd == "table":
        return _table(args)
    return _run(args)
