"""`robust --help` and `robust <command> --help`: the commands and the config groups each one composes."""

from robust_cli.commands import COMMANDS, CONF_DIR, USAGE_GROUPS


def usage() -> str:
    lines = ["usage: robust <command> [key=value ...] [--multirun] [--cfg job]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
    lines += ["", "config groups (pick with group=option):"]
    for group in USAGE_GROUPS:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        if group == "hydra/launcher":  # Hydra's own default has no YAML here
            options = ["basic (default: one job after another)"] + options
        lines.append(f"  {group:<15} {', '.join(options) if options else '(none)'}")
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
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        name = f"{group}@{package}" if package else group
        lines.append(f"  {name:<24} {', '.join(options)}")
    lines += ["", f"the composed config: robust {command} --cfg job [overrides]; every key: docs/reference.md; Hydra's flags: --hydra-help"]
    return "\n".join(lines)
