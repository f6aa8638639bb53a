"""The documentation: the site builds strictly, its reference lists everything the configs hold, the getting-started
commands run as written, and the README's set-up commands are the ones CI runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import reference  # noqa: E402  (docs/hooks/reference.py: the generator the site's hook runs)


def test_site_builds_strictly_and_the_reference_lists_every_option_and_key(tmp_path):
    import mkdocs  # noqa: F401  (the docs extra; scripts/setup_venv.sh test installs it: a missing one is a failure, not a skip)

    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # strict: a broken link, anchor or missing page fails
    assert "WARNING" not in proc.stderr, proc.stderr
    html = (site / "reference" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", html)
    for group, options in reference.group_options().items():
        assert f"{group}" in text, group
        for option in options:
            assert option in text, f"{group}/{option} is missing from the reference"
    for key in reference.top_level_keys():
        assert key in text, f"key {key} is missing from the reference"
    for page in ("getting-started", "faq", "pitfalls", "design", "api", "commands/train", "changelog"):
        assert (site / page / "index.html").is_file(), page
    assert "train.select must be one of" in (site / "faq" / "index.html").read_text()  # the generated error list


def test_every_option_has_a_description_in_its_first_comment():
    missing = [f"{group}/{p.stem}" for group, paths in reference.groups().items() for p in paths if not reference._description(p)]
    assert not missing, f"options without a leading comment: {missing}"


def bash_commands(page: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip().startswith("robust ")]


def test_getting_started_commands_run_on_digits(tmp_path):
    commands = bash_commands(ROOT / "docs" / "getting-started.md")
    assert len(commands) >= 5 and any(c.startswith("robust collect") for c in commands)
    for command in commands:
        args = shlex.split(command)[1:]
        proc = subprocess.run([sys.executable, "-m", "robust_cli", *args], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    assert list((tmp_path / "outputs" / "train" / "multirun").rglob("collected/train_log.csv"))


def test_readme_is_short_and_its_setup_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 20_000
    setup = re.search(r"## Set up.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in setup.splitlines() if line.strip()]
    assert commands == ["scripts/setup_venv.sh", "scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup_venv.sh" in (ROOT / "scripts" / "test.sh").read_text()
    for name in ("LICENSE", "CHANGELOG.md", "CITATION.cff"):
        assert (ROOT / name).is_file(), name


def test_command_help_lists_only_the_groups_the_command_uses(robust):
    from robust_cli.commands.usage import command_help, usage

    train = robust("train", "--help")  # once as a user types it; the other commands' texts in process
    assert train.returncode == 0 and train.stdout.strip() == command_help("train").strip()
    assert "defense" in train.stdout and "attack@train.val_attack" in train.stdout
    assert "\n  search " not in train.stdout and "\n  attack " not in train.stdout  # attack's own groups are not train's
    attack = command_help("attack")
    assert "\n  search " in attack and "\n  attack " in attack
    assert "basic (default" in usage()  # the launcher table's default is listed
