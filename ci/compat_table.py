"""Write one row of the compatibility runner's results into docs/compatibility.md.

    python ci/compat_table.py COMPAT_DIR ROW_RESULT.env docs/compatibility.md

The table lies between the markers ``<!-- compat-table:begin -->`` and ``<!-- compat-table:end -->``;
rows are keyed by torch version (the ``latest`` row, the newest test stack, by that name and listed
last), so running one row replaces only its line. The ahead-of-time
compile check's count is read from the suite's JUnit XML (it runs inside the suite).
"""

import datetime
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"
HEADER = (
    "| torch | Triton | numpy | Python | install | interpreter suite | AOT compile check | "
    "compile smoke (fullgraph) | notes | date |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def read_env(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def junit_counts(path: Path, match: str) -> str:
    """'N passed' (plus failed/skipped) over the test cases whose classname contains ``match``."""
    if not path.is_file():
        return "not run"
    passed = failed = skipped = 0
    for case in ET.parse(path).iter("testcase"):
        if match not in case.get("classname", ""):
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    parts = [f"{passed} passed"] + [f"{n} {w}" for n, w in ((failed, "failed"), (skipped, "skipped")) if n]
    return ("✅ " if failed == 0 and passed else "❌ ") + ", ".join(parts)


LATEST = "latest"


def version_key(row: str):
    if row == LATEST:
        return (float("inf"),)
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+]", row))


def row_key(first_cell: str) -> str:
    """The torch version of a line, or ``latest`` for the newest-stack row ("2.14.1, latest stack")."""
    return LATEST if LATEST in first_cell else first_cell.split("+")[0]


def main(compat_dir: str, result: str, doc: str) -> None:
    env = read_env(Path(result))
    row = env["row"]
    latest = row == LATEST
    mark = lambda ok: "✅" if ok == "ok" else "❌"  # noqa: E731
    if env.get("install") != "ok":
        cells = [env.get("torch", row) + (f", {LATEST} stack" if latest else ""), "", "", "",
                 "❌ (see log)", "not run", "not run", "not run"]
    else:
        suite = f"{mark(env['suite'])} {env.get('suite_line', '')} (suite {env.get('suite_s', '?')} s)"
        smoke = f"{mark(env['smoke'])} {env.get('smoke_line', '').replace('compile smoke: ', '')}"
        aot = junit_counts(Path(compat_dir) / f"junit-{row}.xml", "test_triton_compile")
        cells = [env["torch"].split("+")[0] + (f", {LATEST} stack" if latest else ""), env["triton"], env["numpy"], env["python"],
                 f"✅ {env.get('install_s', '?')} s", suite, aot, smoke]
    notes = [env.get("note", "")]
    if latest and env.get("stack"):
        notes.append(f"unpinned (no constraints.txt): {env['stack']}")
    cells += ["; ".join(n for n in notes if n), datetime.date.today().isoformat()]
    line = "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    path = Path(doc)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {BEGIN} / {END}")
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    rows = {}
    for existing in body.strip().splitlines()[2:]:
        rows[row_key(existing.strip("| ").split(" | ")[0])] = existing
    rows[LATEST if latest else env.get("torch", row).split("+")[0]] = line
    table = "\n".join([HEADER] + [rows[k] for k in sorted(rows, key=version_key)])
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(f"compat: {line}")


if __name__ == "__main__":
    main(*sys.argv[1:])
