"""The console scripts ([project.scripts] in pyproject.toml, as installed) and the jobs run as files: both give
`--help` without starting Ray."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [entry for entry in importlib.metadata.distribution("psunet").entry_points if entry.group == "console_scripts"]
JOBS = sorted(entry.module.removeprefix("jobs.") for entry in SCRIPTS if entry.module.startswith("jobs."))


def test_the_jobs_have_console_scripts():
    assert {"train", "tune", "sample", "evaluate", "benchmark"} <= set(JOBS)
    assert all(f"psunet-{job}" in {entry.name for entry in SCRIPTS} for job in JOBS)


@pytest.mark.parametrize("entry", SCRIPTS, ids=lambda entry: entry.name)
def test_a_console_script_resolves_to_a_main_that_reads_its_arguments(entry, capsys):
    main = entry.load()
    assert callable(main) and entry.attr == "main"
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("job", JOBS)
def test_a_job_file_runs_as_a_script(job):
    done = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {job}.py")
