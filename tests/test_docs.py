"""The README's references hold: the design notes it cites ship with the repository (copies of the team's shared
notes, kept equal to them where they are present), and every file it names exists."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


@pytest.mark.parametrize("name", ["ALGORITHMS.md", "DESIGN.md"])
def test_design_notes_are_the_shared_ones(name):
    mine = os.path.join(ROOT, "docs", name)
    assert os.path.isfile(mine), f"docs/{name} is missing (the README links it)"
    shared = os.path.join(SHARED, name)
    if not os.path.isfile(shared):
        pytest.skip("no ../shared checkout here (a fresh clone): nothing to compare with")
    with open(mine) as a, open(shared) as b:
        assert a.read() == b.read(), f"docs/{name} differs from ../shared/{name}: copy the shared one over"


def test_files_the_readme_names_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    names = set(re.findall(r"\]\(((?:docs|benchmarks|tests|lmobj_kernels|csrc|triton_kernels)/[^)\s]+)\)", text))
    names |= set(re.findall(r"`((?:benchmarks/results|docs)/[A-Za-z0-9_./-]+\.(?:json|md|png|csv))`", text))
    names |= {f"benchmarks/results/{n}" for n in re.findall(r"`((?:gpu-check|[a-z]+-(?:cpu|gpu))-[A-Za-z0-9_.-]+"
                                                             r"\.(?:json|md|png))`", text)}
    assert names, "the README names no files: the patterns here are stale"
    missing = sorted(n for n in names if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, f"the README names files that are not in the repository: {missing}"
