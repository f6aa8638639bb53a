"""`robust --help` and `robust <command> --help`: the commands and the config groups each one composes."""

import os
from pathlib import Path

from robust_cli.commands import COMMANDS, CONF_DIR, USAGE_GROUPS


def user_config_dirs() -> list[Path]:
    """The user's config folders, searched ahead of the package's: ./conf when it exists, then every --config-dir
    (the CLI puts them in ROBUST_CONFIG_DIRS; hydra_plugins/robust_searchpath reads them there)."""
    return [Path(d) for d in os.environ.get("ROBUST_CONFIG_DIRS", "").split(os.pathsep) if d]


def options(group: str) -> list[str]:
    """The options of a config group: the package's and the user's (theirs marked with *)."""
    shipped = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    mine = {p.stem for d in user_config_dirs() for p in (d / group).glob("*.yaml")}
    return sorted(shipped - mine) + sorted(f"{name}*" for name in mine)


def usage() -> str:
    lines = ["usage: robust <command> [key=value ...] [--multirun] [--cfg job]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
    lines += ["", "config groups (pick with group=option):"]
    for group in USAGE_GROUPS:
        found = options(group)
        if group == "hydra/launcher":  # Hydra's own default has no YAML here
            found = ["basic (default: one job after another)"] + found
        lines.append(f"  {group:<15} {', '.join(found) if found else '(none)'}")
    if user_config_dirs():
        lines.append(f"  (* from your config folders, searched first: {', '.join(map(str, user_config_dirs()))})")
    lines += [
        "",
        "examples: robust train model=c_32 dataset=mnist    robust attack attack=pgd 'eps=[0,0.1,0.2]'",
        "help for one command: robust <command> --help",
    ]
    return "\n".join(lines)


def command_groups(config_name: str) -> list[tuple[str, str]]:
    """(group, package) of the config groups a command composes, read from its defaults lists (common.yaml included)."""
    import yaml

    out = []
    for entry in yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text()).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            out += command_groups(entry)
        elif isinstance(entry, dict):
            key = next(iter(entry))
            if key.startswith("override"):
                continue
            group, _, package = key.replace("optional ", "").partition("@")
            out.append((group, package))
    return out


def command_help(command: str) -> str:
    """`robust <command> --help`: what it does and the config groups it uses (Hydra's own help lists every group)."""
    lines = [
        f"robust {command}: {COMMANDS[command]}",
        "",
        "usage: robust " + command + " [group=option ...] [key=value ...] [--multirun] [--cfg job]",
        "",
        "config groups it uses (pick with group=option):",
    ]
    for group, package in command_groups(command):
        name = f"{group}@{package}" if package else group
        lines.append(f"  {name:<24} {', '.join(options(group))}")
    lines += ["", f"the composed config: robust {command} --cfg job [overrides]; every key: docs/reference.md; Hydra's flags: --hydra-help"]
    return "\n".join(lines)
