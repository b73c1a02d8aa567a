"""Every fenced code block of README.md is exercised, so the README cannot drift from the code.

How each block is checked, by its fence language
-------------------------------------------------
``python`` / ``py``
    Executed with ``exec`` in a fresh namespace (blocks do not share names: each is
    self-contained), with the working directory a scratch copy of the repository layout and
    ``REGFIT_DATA_DIR`` pointing at a small offline MNIST split. It must not raise. A block
    that only defines things is executed all the same.
``bash`` / ``sh`` / ``shell`` / ``console``
    Split into commands (on newlines — backslash continuations joined — ``&&``, ``||`` and
    ``;``; comments and a leading ``$`` prompt dropped). For every command, each argument that
    names a file (``configs/…``, ``*.yaml``, ``*.py``, ``*.txt``, ``*.toml``, ``*.ipynb``,
    ``Dockerfile``, …) must exist, outputs (after ``--out``/``-o``/``>``) excepted. Then, by
    program:

    * ``pip install …`` — checked, never run: the ``-c``/``-r`` files exist, a pinned package
      pinned in ``constraints.txt`` too has the same pin there, the extras named in
      ``.[extra]`` exist in ``pyproject.toml``;
    * ``regfit fit|validate|test|predict …`` — run with ``--print_config`` appended: the CLI
      must parse the command and its config (nothing is trained, nothing downloaded);
    * ``regfit sweep …``, ``torchrun …``, ``python -m pytest …``/``pytest …`` — checked: the
      program is installed and the paths exist;
    * ``docker build …`` — the Dockerfile exists and each ``--build-arg NAME=…`` is an ``ARG``
      of it; ``docker run [options] IMAGE CMD…`` — ``CMD…`` is checked as a command itself;
    * ``export NAME=VALUE`` and ``cd DIR`` apply to the block's later commands;
    * anything else (``regfit --help``, ``regfit groups --config …``,
      ``python -m regfit.data …``) — run as written (120 s limit); it must exit 0.
``yaml`` / ``yml``
    Must parse; a first line ``# path/to/file.yaml …`` names a file that must exist.
Other languages (``text``, ``ini``, …) are not checked.

Markers
-------
An HTML comment on the line before the opening fence (blank lines may separate them) changes
how that block is treated; it is invisible on GitHub::

    <!-- readme-test: skip (needs a GPU) -->     not run at all; the reason is required
    <!-- readme-test: check -->                 bash: check every command, run none
    <!-- readme-test: run -->                   bash: run every command as written

Use ``skip (needs a GPU)`` / ``skip (needs a W&B account)`` for commands that cannot run here,
``check`` for a cheap-looking command that is slow or writes outside the scratch directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RUN_TIMEOUT_S = 120

# ---------------------------------------------------------------------------------------------
# Extracting blocks
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
DIRECTIVE = re.compile(r"^(?P<kind>skip|check|run)\s*(?:\((?P<reason>[^)]*)\))?$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: str | None = None  # skip | check | run
    reason: str = ""

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'text'}"


def extract_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown``, each with the marker comment before it."""
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m["fence"], m["lang"].lower(), i
        body, i = [], i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m["indent"]):] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        i += 1  # closing fence
        marker, reason = _marker_before(lines, start)
        blocks.append(Block(lang, "\n".join(body) + "\n", start + 1, marker, reason))
    return blocks


def _marker_before(lines: list[str], fence_index: int) -> tuple[str | None, str]:
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not (m := MARKER.match(lines[j])):
        return None, ""
    d = DIRECTIVE.match(m["body"])
    if not d:
        raise ValueError(
            f"README line {j + 1}: unknown marker {lines[j].strip()!r}; use "
            "'<!-- readme-test: skip (reason) -->', '<!-- readme-test: check -->' or '<!-- readme-test: run -->'"
        )
    if d["kind"] == "skip" and not (d["reason"] or "").strip():
        raise ValueError(f"README line {j + 1}: a skip marker needs a reason, e.g. 'skip (needs a GPU)'")
    return d["kind"], (d["reason"] or "").strip()


# ---------------------------------------------------------------------------------------------
# Commands of a shell block
# ---------------------------------------------------------------------------------------------


def split_commands(code: str) -> list[list[str]]:
    """Each simple command of a shell snippet as argv, environment assignments kept in front."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "&"):
                if current:
                    commands.append(current)
                current = []
            elif token == "|":
                raise ValueError(f"pipes are not supported in README commands: {line!r}")
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


FILE_LIKE = re.compile(r"^[\w.~/-]*[\w-]\.(ya?ml|py|txt|toml|json|ipynb|cfg|ini|sh|md)$|(^|/)Dockerfile$|^configs/")
OUTPUT_OPTIONS = {"--out", "-o", "--output", ">", ">>", "--output-dir", "--outdir", "-t", "--tag"}
LIGHTNING_SUBCOMMANDS = {"fit", "validate", "test", "predict"}


def referenced_paths(argv: list[str]) -> list[str]:
    """Arguments of ``argv`` that name input files (outputs and URLs excluded)."""
    paths = []
    for i, token in enumerate(argv):
        if i and argv[i - 1] in OUTPUT_OPTIONS:
            continue
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if "://" in value or value.startswith("-"):
            continue
        if FILE_LIKE.search(value):
            paths.append(value)
    return paths


def _strip_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        key, value = argv[0].split("=", 1)
        env[key] = value
        argv = argv[1:]
    return env, argv


class CommandChecker:
    """Checks or runs README commands inside ``cwd`` (a scratch mirror of the repository)."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd = cwd
        self.env = env
        self.ran: list[list[str]] = []

    def check(self, argv: list[str], force: str | None = None) -> None:
        extra_env, argv = _strip_env(argv)
        assert argv, "empty command"
        for path in referenced_paths(argv):
            assert (self.cwd / path).exists(), f"{shlex.join(argv)}: {path} does not exist"
        prog = argv[0]
        if prog == "export":  # later commands of the block see the variables
            self.env.update(_strip_env(argv[1:])[0])
            return None
        if prog == "cd":
            self.cwd = Path(os.path.normpath(self.cwd / argv[1]))  # normpath: stay in the mirror
            assert self.cwd.is_dir(), f"cd {argv[1]}: no such folder"
            return None
        if force == "run":
            return self._run(argv, extra_env)
        if prog in ("pip", "pip3") or argv[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
            return self._check_pip(argv[argv.index("pip") + 1 if "pip" in argv else 1:])
        if prog == "docker":
            return self._check_docker(argv, force)
        self._require_program(prog)
        if prog == "regfit" and len(argv) > 1 and argv[1] in LIGHTNING_SUBCOMMANDS:
            if force != "check":
                self._run(argv + ["--print_config"], extra_env)
            return
        if prog == "regfit" and len(argv) > 1 and argv[1] == "sweep":
            return
        if prog in ("torchrun", "pytest") or argv[1:3] == ["-m", "pytest"]:
            return
        if force != "check":
            self._run(argv, extra_env)

    # -- programs ----------------------------------------------------------------------------
    def _require_program(self, prog: str) -> None:
        if prog in ("python", "python3"):
            return
        assert shutil.which(prog, path=self.env.get("PATH")), f"{prog}: not installed"

    def _run(self, argv: list[str], extra_env: dict[str, str]) -> None:
        argv = [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]
        proc = subprocess.run(argv, cwd=self.cwd, env={**self.env, **extra_env}, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
        self.ran.append(argv)
        assert proc.returncode == 0, (
            f"`{shlex.join(argv)}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )

    def _check_pip(self, args: list[str]) -> None:
        assert args and args[0] == "install", f"pip {' '.join(args)}: only `pip install` is checked"
        pins = constraint_pins(REPO / "constraints.txt")
        extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        it = iter(args[1:])
        for token in it:
            if token in ("-c", "--constraint", "-r", "--requirement"):
                path = next(it)
                assert (self.cwd / path).is_file(), f"pip install: {path} does not exist"
            elif token in ("--index-url", "--extra-index-url", "-i"):
                next(it)
            elif token.startswith("-"):
                continue
            elif m := re.match(r"^\.(?:\[(?P<extras>[\w,\s-]*)\])?$", token):
                wanted = {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
                assert wanted <= extras, f"pip install {token}: no extra {sorted(wanted - extras)} in pyproject.toml"
            elif m := re.match(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)$", token):
                name = m["name"].lower()
                if name in pins:
                    assert pins[name] == m["version"], (
                        f"pip install {token}: constraints.txt pins {name}=={pins[name]}"
                    )

    def _check_docker(self, argv: list[str], force: str | None) -> None:
        sub = argv[1] if len(argv) > 1 else ""
        if sub == "build":
            dockerfile = "Dockerfile"
            for i, token in enumerate(argv):
                if token in ("-f", "--file"):
                    dockerfile = argv[i + 1]
            text = (self.cwd / dockerfile).read_text()
            declared = set(re.findall(r"^ARG\s+(\w+)", text, flags=re.M))
            for i, token in enumerate(argv):
                if token == "--build-arg":
                    name = argv[i + 1].split("=", 1)[0]
                    assert name in declared, f"docker build: --build-arg {name} is no ARG of {dockerfile}"
        elif sub == "run":
            rest = argv[2:]
            while rest and rest[0].startswith("-"):
                option = rest.pop(0)
                if option in DOCKER_VALUE_OPTIONS and "=" not in option:
                    rest.pop(0)
            assert rest, f"{shlex.join(argv)}: no image"
            if rest[1:]:
                self.check(rest[1:], force="check" if force is None else force)
        else:
            raise AssertionError(f"{shlex.join(argv)}: only `docker build` and `docker run` are checked")


DOCKER_VALUE_OPTIONS = {
    "-v", "--volume", "-e", "--env", "--env-file", "--name", "--gpus", "-p", "--publish",
    "--entrypoint", "-w", "--workdir", "--shm-size", "-u", "--user", "--mount", "--network",
    "--ipc", "--cpus", "-m", "--memory",
}


def constraint_pins(path: Path) -> dict[str, str]:
    """``{package: version}`` of the ``name==version`` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line):
            pins[m[1].lower()] = m[2]
    return pins


# ---------------------------------------------------------------------------------------------
# Running a block
# ---------------------------------------------------------------------------------------------


def mirror_repo(dst: Path) -> Path:
    """``dst/repo`` with a symlink to every top-level entry of the repository except data and
    logs, and ``dst/shared`` pointing at the shared folder beside the repository: commands see
    the repository layout but write into ``dst``."""
    repo = dst / "repo"
    repo.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in {"data", "logs", "lightning_logs", "wandb", ".git"}:
            (repo / entry.name).symlink_to(entry)
    shared = REPO.parent / "shared"
    if shared.exists():
        (dst / "shared").symlink_to(shared)
    return repo


def check_block(block: Block, checker: CommandChecker) -> None:
    """Run or check one block; raise (AssertionError or the block's exception) on a problem."""
    if block.lang in ("python", "py"):
        # Padded so that a traceback names the README's own line numbers.
        code = compile("\n" * block.line + block.code, "README.md", "exec")
        cwd = os.getcwd()
        os.chdir(checker.cwd)
        try:
            exec(code, {"__name__": "__readme__"})
        finally:
            os.chdir(cwd)
    elif block.lang in ("bash", "sh", "shell", "console"):
        for argv in split_commands(block.code):
            checker.check(argv, force=block.marker)
    elif block.lang in ("yaml", "yml"):
        yaml.safe_load(block.code)
        first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
        if m := re.match(r"^#\s*(\S+\.ya?ml)\b", first):
            assert (checker.cwd / m[1]).is_file(), f"yaml block names {m[1]}, which does not exist"


@pytest.fixture
def checker(tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> CommandChecker:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(REGFIT_DATA_DIR=str(mnist_dir), WANDB_MODE="disabled", MPLBACKEND="Agg")
    for key in ("REGFIT_DATA_DIR", "WANDB_MODE", "MPLBACKEND"):
        monkeypatch.setenv(key, env[key])
    return CommandChecker(mirror_repo(tmp_path), env)


README_BLOCKS = extract_blocks(README.read_text())


@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda b: b.id)
def test_readme_block(block: Block, checker: CommandChecker):
    if block.marker == "skip":
        pytest.skip(f"README line {block.line}: {block.reason}")
    check_block(block, checker)


def test_readme_has_the_setup_commands_first():
    # CI runs these exact commands (.ci/run); the README must keep them first and unchanged.
    first = next(b for b in README_BLOCKS if b.lang == "bash")
    commands = [shlex.join(c) for c in split_commands(first.code)]
    assert commands[:3] == [
        "pip install -c constraints.txt torch==2.13.0",
        "pip install -c constraints.txt -e .",
        "regfit fit --config configs/mnist_l2.yaml",
    ]
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -q -c constraints.txt torch==2.13.0 && pip install -q -c constraints.txt -e ".[test]" && python -m pytest -q' in ci
    assert 'pip install -c constraints.txt -e ".[test]"' in first.code


# ---------------------------------------------------------------------------------------------
# The harness itself: it must catch what it promises to catch
# ---------------------------------------------------------------------------------------------


def test_extracts_blocks_markers_and_languages():
    md = (
        "# t\n\n```python\nx = 1\n```\n\n<!-- readme-test: skip (needs a GPU) -->\n\n"
        "```bash\nregfit fit --config configs/gpu.yaml\n```\n\n````yaml\n# configs/a.yaml\na: 1\n````\n"
    )
    blocks = extract_blocks(md)
    assert [(b.lang, b.line, b.marker, b.reason) for b in blocks] == [
        ("python", 3, None, ""),
        ("bash", 9, "skip", "needs a GPU"),
        ("yaml", 13, None, ""),
    ]
    assert blocks[2].code == "# configs/a.yaml\na: 1\n"


@pytest.mark.parametrize("marker", ["<!-- readme-test: skip -->", "<!-- readme-test: skp (x) -->"])
def test_bad_marker_is_an_error(marker: str):
    with pytest.raises(ValueError, match="README line 1"):
        extract_blocks(f"{marker}\n```bash\nls\n```\n")


def test_split_commands():
    code = (
        "# comment\n$ pip install -c constraints.txt torch==2.13.0 && pip install -e \".[test]\"\n"
        "CUDA_VISIBLE_DEVICES=0,1 regfit fit \\\n    --config configs/x.yaml  # trailing\n"
    )
    assert split_commands(code) == [
        ["pip", "install", "-c", "constraints.txt", "torch==2.13.0"],
        ["pip", "install", "-e", ".[test]"],
        ["CUDA_VISIBLE_DEVICES=0,1", "regfit", "fit", "--config", "configs/x.yaml"],
    ]


def test_referenced_paths():
    argv = ["python", "-m", "regfit.data", "--from-test-set", "../shared/data/mnist", "--out", "data/x.yaml",
            "--config=configs/a.yaml", "--lr", "0.1", "https://h/x.yaml", "Dockerfile"]
    assert referenced_paths(argv) == ["configs/a.yaml", "Dockerfile"]


def _harness_checker(tmp_path: Path) -> CommandChecker:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return CommandChecker(mirror_repo(tmp_path), env)


def test_missing_config_fails(tmp_path: Path):
    checker = _harness_checker(tmp_path)
    block = Block("bash", "regfit fit --config configs/no_such_config.yaml\n", 1)
    with pytest.raises(AssertionError, match="configs/no_such_config.yaml does not exist"):
        check_block(block, checker)
    assert checker.ran == []  # failed before starting anything


def test_raising_python_block_fails(tmp_path: Path):
    block = Block("python", "from regfit.penalties import L2\nL2().value(None)\n", 7)
    with pytest.raises(AttributeError) as info:
        check_block(block, _harness_checker(tmp_path))
    frames = [(e.frame.code.raw.co_filename, e.lineno + 1) for e in info.traceback]
    assert ("README.md", 9) in frames  # the block's second line, 7 + 2


def test_pip_checks(tmp_path: Path):
    checker = _harness_checker(tmp_path)
    checker.check(["pip", "install", "-c", "constraints.txt", "torch==2.13.0"])
    checker.check(["pip", "install", "-c", "constraints.txt", "-e", ".[test]"])
    with pytest.raises(AssertionError, match="constraints.txt pins torch=="):
        checker.check(["pip", "install", "-c", "constraints.txt", "torch==2.0.0"])
    with pytest.raises(AssertionError, match="no extra"):
        checker.check(["pip", "install", "-e", ".[nosuchextra]"])
    with pytest.raises(AssertionError, match="does not exist"):
        checker.check(["pip", "install", "-c", "no-constraints.txt", "."])
    assert checker.ran == []


def test_docker_checks(tmp_path: Path):
    checker = _harness_checker(tmp_path)
    checker.check(["docker", "build", "--build-arg", "TORCH_VARIANT=cpu", "-t", "regfit:cpu", "."])
    with pytest.raises(AssertionError, match="NO_SUCH_ARG is no ARG"):
        checker.check(["docker", "build", "--build-arg", "NO_SUCH_ARG=1", "."])
    with pytest.raises(AssertionError, match="configs/nope.yaml does not exist"):
        checker.check(["docker", "run", "--gpus", "all", "-v", "d:/data", "regfit", "regfit", "fit",
                       "--config", "configs/nope.yaml"])


def test_runnable_command_failure_is_reported(tmp_path: Path):
    checker = _harness_checker(tmp_path)
    for argv in split_commands("export GREETING=hi\ncd tests\npython -c 'import os; assert os.environ[\"GREETING\"] == \"hi\"'"):
        checker.check(argv)
    assert checker.cwd.name == "tests" and checker.ran
    with pytest.raises(AssertionError, match="exited 3"):
        checker.check(["python", "-c", "raise SystemExit(3)"])


def test_the_penalty_tables_list_every_builtin_with_its_short_name():
    """The README's penalty tables are derived from regfit.penalties.BUILTINS: each built-in
    has a row with its class and its config short name, and no row names a penalty that is
    not a built-in."""
    from regfit.penalties import BUILTINS

    text = (REPO / "README.md").read_text(encoding="utf-8")
    rows = [ln for ln in text.splitlines() if ln.startswith("| `") and "(`" in ln.split("|")[1]]
    named = {re.match(r"\| `(\w+)\(", r).group(1): re.search(r"\(`(\w+)`\)", r).group(1) for r in rows
             if re.match(r"\| `(\w+)\(", r) and re.search(r"\(`(\w+)`\)", r)}
    assert named == {b.cls.__name__: b.name for b in BUILTINS}
