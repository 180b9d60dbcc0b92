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
