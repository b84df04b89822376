"""The README's two set-up commands stay true: CI runs the test command, the quickstart exists."""

import re


def setup_commands(readme: str) -> list[str]:
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_two_setup_commands(repo):
    commands = setup_commands((repo / "README.md").read_text())
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    quickstart, tests = commands
    assert "megatron-lowp train recipes/quickstart.yaml" in quickstart and "torch==2.13.0" in quickstart
    assert (repo / "recipes/quickstart.yaml").is_file()
    assert "pytest" in tests and "torch==2.13.0" in tests


def test_ci_runs_the_readme_test_command(repo):
    tests_command = setup_commands((repo / "README.md").read_text())[1]
    ci_lines = [line.strip() for line in (repo / ".ci/run").read_text().splitlines()]
    assert tests_command in ci_lines


def test_nothing_cites_a_path_outside_the_repository(repo):
    """Users cannot open files outside the repository: the papers' facts are in docs/papers.md."""
    import subprocess

    files = subprocess.check_output(["git", "ls-files"], cwd=repo, text=True).split()
    outside = re.compile("/wo" + "rk/|sha" + "red/reference|reference/pap" + "ers\\.md")  # split: not a hit itself
    hits = [f"{name}:{i}" for name in files if (repo / name).is_file() and not (repo / name).is_symlink()
            for i, line in enumerate((repo / name).read_text(errors="ignore").splitlines(), 1) if outside.search(line)]
    assert not hits, hits
