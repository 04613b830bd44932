"""The README's promises: CI runs exactly its test command; its API names exist."""

import re
from pathlib import Path

import elastic_fx as efx

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.strip() for b in _bash_blocks(readme)]
    assert len(blocks) >= 2, "the quick start has two commands"
    main_job, tests = blocks[0], blocks[1]
    assert "elastic-fx demo" in main_job and main_job.startswith("pip install")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == tests


def test_readme_api_names_exist():
    readme = (ROOT / "README.md").read_text()
    names = set(re.findall(r"\befx\.([A-Za-z_][A-Za-z_0-9]*)", readme))
    missing = sorted(n for n in names if not hasattr(efx, n))
    assert not missing, f"README mentions efx.{missing} which the package does not export"


def test_version_lives_in_one_place():
    setup = (ROOT / "setup.py").read_text()
    assert "__version__" in setup and efx.__version__ not in setup
