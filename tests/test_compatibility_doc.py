"""docs/compatibility.md says what the code does: its tables against the rule sets and the flag rows."""

from __future__ import annotations

import re
from pathlib import Path

from clirun import invoke
from istio_init.config import FLAGS, RULE_SET_RELEASES, releases_text, rule_set_of_release, rule_sets_text

DOC = (Path(__file__).parent.parent / "docs" / "compatibility.md").read_text()


def test_release_table_names_each_release_rule_set_and_the_value_works() -> None:
    rows = re.findall(r"^\| 1\.(\d+) \| G(\d+) \| `([^`]+)` \| `(1\.\d+)` \| `istio-init:(1\.\d+)` \|$", DOC, re.M)
    assert [int(minor) for minor, *_ in rows] == list(range(8, 33))
    names = list(RULE_SET_RELEASES)
    for minor, generation, name, value, tag in rows:
        assert rule_set_of_release(int(minor)) == name == names[int(generation) - 1]
        assert value == tag == f"1.{minor}"
    for value in ("1.10", "1.17.3", "1.22.0"):
        result = invoke(["--rules-version", value, "-n", "--ipv6", "false"])
        assert result.code == 0, result.stderr


def test_flag_table_is_the_flag_rows() -> None:
    rows = re.findall(r"^\| (`[^|]+) \| (1\.[\d.-]+) \| ([\w. ]+) \|$", DOC, re.M)
    want = []
    for spec in FLAGS:
        if spec.releases != (8, 32):
            name = f"`{spec.env}`" if spec.env_only else f"`{spec.label}`" + (f" / `{spec.env}`" if spec.env else "")
            note = " (accepted; changes no rule)" if spec.no_effect else ""
            want.append((name + note, releases_text(spec.releases), rule_sets_text(spec.releases)))
    assert rows == want


def _flags_table() -> str:
    lines = ["| flag | variable | default | Istio releases (`--rules-version`) | what it does |", "|---|---|---|---|---|"]
    for spec in FLAGS:
        flag = "" if spec.env_only else f"`{spec.label}`"
        variable = f"`{spec.env}`" if spec.env else ""
        default = "" if spec.is_switch else (f"`{spec.default}`" if spec.default else "empty")
        releases = ("all" if spec.releases == (8, 32)
                    else f"{releases_text(spec.releases)} ({rule_sets_text(spec.releases)})")
        lines.append(f"| {flag} | {variable} | {default} | {releases} | {spec.help.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def test_flags_page_table_is_the_flag_rows() -> None:
    """docs/flags.md's table is rendered from config.FLAGS (UPDATE_DOCS=1 rewrites it)."""
    import os

    page = Path(__file__).parent.parent / "docs" / "flags.md"
    text = page.read_text()
    start = text.index("| flag | variable |")
    end = text.index("\n\n", start) + 1
    if os.environ.get("UPDATE_DOCS") == "1":
        page.write_text(text[:start] + _flags_table() + text[end:])
        text = page.read_text()
    assert text[start:text.index("\n\n", start) + 1] == _flags_table()
