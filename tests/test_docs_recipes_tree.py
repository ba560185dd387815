"""docs/recipes.md's tree of recipes/ names every file under recipes/ (each option in its group's line)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree() -> dict[str, set[str]]:
    """``{group: names}`` from the first code block of docs/recipes.md (continuation lines belong to the group above)."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    block = text.split("```\nrecipes/\n", 1)[1].split("```", 1)[0]
    groups: dict[str, set[str]] = {}
    group = None
    for line in block.splitlines():
        m = re.match(r"  (\w+)/\s+(.*)", line)
        if m:
            group, rest = m.group(1), m.group(2)
        elif line.startswith("   ") and group:  # a continuation line: options after "|"
            rest = line if line.strip().startswith("|") else ""
        else:
            group, rest = None, ""
        if group:
            groups.setdefault(group, set()).update(re.findall(r"(?:^|\|)\s*([a-z0-9_]+)", rest))
    return groups


def test_every_recipe_file_is_in_the_docs_tree():
    listed = tree()
    missing = sorted(f"{d.name}/{f.stem}" for d in (ROOT / "recipes").iterdir() if d.is_dir()
                     for f in d.glob("*.yaml") if f.stem not in listed.get(d.name, set()))
    assert not missing, f"docs/recipes.md's recipes/ tree omits {missing}"
