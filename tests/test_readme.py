"""Every command line README.md shows (`python ...`, `psunet-*`, `dataprep`, `make`, and the `python` command a
`ray job submit` runs) parses with today's code: its parser takes the options and sub-command it names, a training
command's config and overrides load, a make target exists. A renamed option, field or target fails here."""

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from jobs.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("python ", "psunet-", "dataprep ", "make ", "ray job submit ")
MODULES = {"dataprep": "dataprep.__main__", "psunet.model_folder": "psunet.model_folder"}


def normalised(words: list[str]) -> list[str]:
    """A usage synopsis as one command: `[--samples 4000]` -> `--samples 4000`, `1|2` -> `1`."""
    out = []
    for word in words:
        if word.startswith("[-"):
            word = word[1:]
        if word.endswith("]") and "[" not in word:
            word = word[:-1]
        if "|" in word and " " not in word:
            word = word.split("|")[0]
        out.append(word)
    return out


def shown_commands(text: str) -> list[str]:
    """The command lines of the fenced code blocks (continuation lines joined, comments dropped) and of the inline
    code spans that invoke a program (make and a target, or a program with options); a span with a placeholder
    for the program or its sub-command (`python jobs/<name>.py`) is prose, not a command."""
    commands = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line.startswith(PROGRAMS):
                commands.append(shlex.join(shlex.split(line, comments=True)))
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        words = span.split()
        program = 1 if words[0] != "python" else 3 if words[1:2] == ["-m"] else 2
        invoked = words[0] == "make" or any(word.startswith("-") for word in words[program:])
        if span.startswith(PROGRAMS) and len(words) > program and invoked and "<" not in " ".join(words[:program + 1]):
            commands.append(shlex.join(words))
    return list(dict.fromkeys(commands))


def job_and_arguments(words: list[str]):
    """(the module whose parser reads this command line, its arguments)."""
    if words[:3] == ["ray", "job", "submit"]:
        words = words[words.index("--") + 1:]
    if words[0] == "python":
        module = MODULES[words[2]] if words[1] == "-m" else words[1].removesuffix(".py").replace("/", ".")
        arguments = words[3:] if words[1] == "-m" else words[2:]
    else:
        module = MODULES.get(words[0], "jobs." + words[0].removeprefix("psunet-"))
        arguments = words[1:]
    return importlib.import_module(module), arguments


COMMANDS = shown_commands((ROOT / "README.md").read_text())


def test_the_readme_shows_the_main_commands():
    programs = {" ".join(c.split()[:2]) for c in COMMANDS}
    assert {"make demo", "make test", "make test-fast", "python jobs/train.py", "python jobs/sample.py",
            "python jobs/evaluate.py", "python jobs/tune.py", "python jobs/benchmark.py", "python -m"} <= programs
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_the_readme_shows_parses(command):
    words = normalised(shlex.split(command))
    if words[0] == "make":
        done = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return
    job, arguments = job_and_arguments(words)
    try:  # the job's own parsing where it has more than its parser (benchmark: options and overrides intermixed)
        args = job.parse(arguments) if hasattr(job, "parse") else job.build_parser().parse_args(arguments)
    except SystemExit as exit:
        assert exit.code == 0 and "--help" in arguments, f"{command!r} does not parse"
        return
    if job.__name__ == "jobs.train" and (ROOT / args.config).is_file():  # a config of the repository: it loads
        load_config(str(ROOT / args.config), args.overrides)
