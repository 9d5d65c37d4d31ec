"""The README stays true to the code: every flag documented, the Quick start as CI runs it."""

from __future__ import annotations

import re
from pathlib import Path

from kap.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_flag_and_env_var_is_documented() -> None:
    for opt in OPTIONS:
        for flag in opt.flags:
            assert f"`{flag}`" in README, flag
        assert f"`{opt.env}`" in README, opt.env


def test_quick_start_has_two_command_lines_and_ci_runs_the_second() -> None:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```\w*\n(.*?)```", section, re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    assert "demo" in lines[0] and "tests" in lines[1]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()


def test_the_nursery_tree_names_modules_that_exist() -> None:
    tree = README.split("### The nursery tree", 1)[1].split("```")[1]
    for module in re.findall(r"\(kap/(\w+)\.py\)", tree):
        assert (ROOT / "kap" / f"{module}.py").exists(), module


def test_the_upstreams_example_has_exactly_the_reported_fields() -> None:
    import json

    import attrs

    from kap.report import UpstreamReport

    section = README.split("`/upstreams`:", 1)[1]
    example = re.search(r"```json\n(.*?)```", section, re.S)
    assert example is not None
    text = example.group(1).replace('"discovery": {"...": "see Discovery"}', '"discovery": {}')
    doc = json.loads(text)
    assert set(doc["upstreams"][0]) == {f.name for f in attrs.fields(UpstreamReport)}
