"""Print recorded benchmark runs as ratio tables: each result against its group's baseline.

    python benchmarks/summarize.py benchmarks/results/grokfast-cpu.json [more.json ...]

Every pytest-benchmark group holds the variants measured side by side in one run; the
ratio column divides each mean by the mean of the group's baseline, the first present of
``plain``, ``adamw``, ``adam``, ``copy-floor`` (so ours / the reference way / the floor read
off one table). Where a group has a ``copy-floor`` the last column gives each variant's time
in copies of the same bytes: a filter that reads g and mu and writes both moves two copies'
worth, so 2.0 there is copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

BASELINES = ("plain", "adamw", "adam", "copy-floor")


def _variant(bench: dict) -> str:
    """The variant's name: the ``impl``/``variant`` parameter, else the bracketed id."""
    params = bench.get("params") or {}
    for key in ("impl", "variant"):
        if key in params:
            return str(params[key])
    match = re.search(r"\[(.*)\]", bench["name"])
    return match.group(1) if match else bench["name"]


def _seconds(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def summarize(path: Path, console: Console) -> None:
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {})
    extra = machine.get("grokopt", {})
    where = extra.get("gpu") or machine.get("cpu", {}).get("brand_raw", "?")
    console.print(f"[bold]{path.name}[/bold]: {where}; torch {extra.get('torch', '?')}; "
                  f"{data.get('datetime', '')}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or "(no group)"].append(bench)
    for group, benches in groups.items():
        means = {_variant(b): b["stats"]["mean"] for b in benches}
        base = next((n for n in BASELINES if n in means), None)
        copy = means.get("copy-floor") if base != "copy-floor" else None
        table = Table(title=group, title_justify="left")
        table.add_column("variant")
        table.add_column("mean", justify="right")
        table.add_column(f"x {base}" if base else "x baseline", justify="right")
        if copy:
            table.add_column("x copy", justify="right")
        for name, mean in sorted(means.items(), key=lambda kv: kv[1]):
            row = [name, _seconds(mean), f"{mean / means[base]:.2f}" if base else "-"]
            if copy:
                row.append(f"{mean / copy:.2f}")
            table.add_row(*row)
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--width", type=int, default=110, help="output width in characters")
    args = parser.parse_args(argv)
    console = Console(width=args.width)
    for path in args.files:
        summarize(path, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
