"""MkDocs hook: the parts of the documentation that are read off the code at build time, so they cannot drift.

Markers in a page's Markdown are replaced by tables built from the shipped YAML files and the validators:
    <!-- reference:common -->          the keys every command shares (conf/common.yaml), default and comment
    <!-- reference:command NAME -->    the keys a command adds (conf/NAME.yaml)
    <!-- reference:groups -->          every config group, every option, its first comment line and its keys
    <!-- reference:choices -->         the closed sets of values the validators accept
    <!-- reference:errors -->          every one-line error message the code can raise, by module
`python docs/hooks/reference.py` prints the generated Markdown (for a quick look without building the site).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "robust_cli" / "conf"
PACKAGE = ROOT / "robust_cli"
COMMANDS = ("train", "attack", "persistence", "boundary", "kernel", "certify", "export", "info")
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w./@-]*):(?P<rest>.*)$")


# ----------------------------------------------------------------------------------------------- YAML reading
def _comments(path: Path) -> dict[str, str]:
    """{dotted key: its end-of-line comment} from the YAML text (PyYAML drops comments)."""
    stack: list[tuple[int, str]] = []
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "-")):
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent, key = len(match["indent"]), match["key"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        rest = match["rest"]
        if "#" in rest and not rest.strip().startswith(("'", '"')):
            out[dotted] = rest.split("#", 1)[1].strip()
    return out


def _flatten(node, prefix="") -> dict:
    if isinstance(node, dict) and node and not (prefix and "_target_" in node and prefix.count(".") > 3):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in data.items() if k not in ("defaults", "hydra")}


def _value(v) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    text = str(v) if not isinstance(v, (list, dict)) else yaml.safe_dump(v, default_flow_style=True).strip()
    return f"`{text}`".replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_table(path: Path, skip=()) -> str:
    comments, rows = _comments(path), []
    for key, value in _flatten(_load(path)).items():
        if key.split(".")[0] in skip or key == "table" or key.startswith("table."):
            continue
        rows.append(f"| `{key}` | {_value(value)} | {_cell(comments.get(key, ''))} |")
    if not rows:
        return "No keys of its own: it takes the [shared keys](../reference.md#keys-every-command-shares).\n"
    return "| key | default | meaning |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"


def top_level_keys() -> set[str]:
    """Every key of common.yaml and the command YAMLs, dotted (what the reference must list)."""
    keys = set(_flatten(_load(CONF / "common.yaml")))
    for command in COMMANDS:
        keys |= set(_flatten(_load(CONF / f"{command}.yaml")))
    return keys


# ----------------------------------------------------------------------------------------------- groups
def groups() -> dict[str, list[Path]]:
    """{group path: its option files}, nested groups included (experiment/mnist_defense, hydra/launcher)."""
    out = {}
    for folder in sorted(p for p in CONF.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        options = sorted(folder.glob("*.yaml"))
        if options:
            out[folder.relative_to(CONF).as_posix()] = options
    return out


def _description(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
        if len(" ".join(lines)) > 180:
            break
    text = " ".join(lines)
    return (text[:240] + " ...") if len(text) > 240 else text


def _settings(path: Path) -> str:
    flat = _flatten(_load(path))
    shown = [
        f"{k}={_value(v).strip('`')}"
        for k, v in flat.items()
        if not k.startswith("table") and k != "_target_" and not k.endswith("._target_") and k != "scales" and not k.startswith("scales.")
    ][:10]
    target = flat.get("_target_")
    return _cell((f"`{target}`" + ("; " if shown else "") if target else "") + ", ".join(f"`{s}`" for s in shown))


def groups_markdown() -> str:
    parts = []
    for group, options in groups().items():
        pick = f"{group}=OPTION" if not group.startswith("experiment/") else f"{group}=OPTION (a preset's sweep axis)"
        parts.append(f"### `{group}`\n\nPick with `{pick}`.\n\n| option | what it is | settings (defaults) |\n| --- | --- | --- |")
        for path in options:
            parts.append(f"| `{path.stem}` | {_cell(_description(path))} | {_settings(path)} |")
        parts.append("")
    return "\n".join(parts)


def group_options() -> dict[str, list[str]]:
    return {group: [p.stem for p in options] for group, options in groups().items()}


# ----------------------------------------------------------------------------------------------- validators
def _constants(module: Path) -> dict[str, tuple]:
    tree = ast.parse(module.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and isinstance(node.value, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.value.elts):
                out[name] = tuple(e.value for e in node.value.elts)
    return out


CHOICES = [  # (setting, module, constant)
    ("optimizer= (the shipped YAMLs; any torch optimizer through one of one's own)", "training/loop.py", "OPTIMIZERS"),
    ("scheduler= (the shipped YAMLs; any torch scheduler through one of one's own)", "training/loop.py", "SCHEDULERS"),
    ("train.select", "training/loop.py", "SELECTIONS"),
    ("defense.attack_bn", "defenses/adversarial.py", "ATTACK_BN"),
    ("attack.norm (budgeted attacks)", "attacks/norms.py", "NORMS"),
    ("attack.norm (attacks with an l1 version: APGD, APGD-T, FAB, FAB-T, Square, AutoAttack)", "attacks/norms.py", "L1_NORMS"),
    ("attack.targeted", "attacks/base.py", "TARGET_MODES"),
    ("attack.loss", "attacks/base.py", "LOSSES"),
    ("attack.vote", "attacks/base.py", "VOTES"),
]


def choices_markdown() -> str:
    rows = ["| setting | accepted values | checked in |", "| --- | --- | --- |"]
    for setting, module, constant in CHOICES:
        values = _constants(PACKAGE / module).get(constant)
        if values:
            rows.append(f"| `{setting}` | {', '.join(f'`{v}`' for v in values)} | `robust_cli/{module}` (`{constant}`) |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------------- errors
def _message(node: ast.AST) -> str | None:
    """The text of a UserError's message, with each formatted field shown as <...>."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "<...>" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message(node.left), _message(node.right)
        return None if left is None and right is None else f"{left or '<...>'}{right or '<...>'}"
    return None


def user_errors() -> dict[str, list[str]]:
    """{module: [message, ...]} for every `raise UserError(...)` in the package."""
    out: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and getattr(node.exc.func, "id", None) == "UserError" and node.exc.args:
                text = _message(node.exc.args[0])
                if text:
                    out.setdefault(path.relative_to(ROOT).as_posix(), []).append(" ".join(text.split()))
    return out


def errors_markdown() -> str:
    parts = []
    for module, messages in user_errors().items():
        parts.append(f"**`{module}`**\n")
        parts += [f"- {_cell(m).replace('<...>', '&lt;…&gt;')}" for m in dict.fromkeys(messages)]
        parts.append("")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- the hook
def render(markdown: str) -> str:
    markdown = markdown.replace("<!-- reference:common -->", key_table(CONF / "common.yaml"))
    markdown = markdown.replace("<!-- reference:groups -->", groups_markdown())
    markdown = markdown.replace("<!-- reference:choices -->", choices_markdown())
    markdown = markdown.replace("<!-- reference:errors -->", errors_markdown())
    return re.sub(r"<!-- reference:command (\w+) -->", lambda m: key_table(CONF / f"{m[1]}.yaml"), markdown)


def on_page_markdown(markdown, page=None, config=None, files=None, **kwargs):
    return render(markdown)


if __name__ == "__main__":
    print(
        render("<!-- reference:common -->\n<!-- reference:command attack -->\n<!-- reference:groups -->\n<!-- reference:choices -->\n<!-- reference:errors -->")
    )
