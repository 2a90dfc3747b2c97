"""Pages generated at build time (mkdocs-gen-files), so that they cannot drift from the code they describe.

- index.md: the README, its links into docs/ made relative to the site;
- reference/run-config.md and reference/node-config.md: every key of `fl_server.run.config.RunConfig` and
  `fl_client.config.PlantConfig` with its type, default and limits, and the comments beside it in the source;
- reference/cli.md: the `--help` of every command of every maxfl console script, from the typer apps.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def index_page() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", readme)


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines right above its declaration and the comment at its end, joined."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, lines[n - 1].strip().lstrip("#").strip())
            n -= 1
        end = trailing.get(node.end_lineno or node.lineno, "") if not lines[(node.end_lineno or node.lineno) - 1].strip().startswith("#") else ""
        out[node.target.id] = " ".join([*above, end]).strip()
    return out


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    return text.replace(" | ", " or ")


def _limits(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("pattern", "matches")):
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{sign} `{value}`")
    return ", ".join(parts)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{value!r}`" if value is not None else "not set"


def model_page(cls: type, title: str, intro: str) -> str:
    comments = {}
    for base in reversed(cls.__mro__):
        if base.__module__.startswith(("fl_server", "fl_client", "maxfl", "privacy")) and "model_fields" in dir(base):
            try:
                comments |= _comments(base)
            except (OSError, TypeError, IndexError):
                pass
    rows = ["| key | type | default | limits | what it is |", "| --- | --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
        key = field.alias or name.replace("_", "-")
        note = (field.description or comments.get(name, "")).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{key}` | `{_type(field.annotation)}` | {_default(field)} | {_limits(field)} | {note} |")
    return f"# {title}\n\n{intro}\n\n" + "\n".join(rows) + "\n"


def cli_page() -> str:
    import click
    import typer
    import typer.core

    from launcher.cli import app

    typer.core.HAS_RICH = False  # click's plain help text, not rich's boxes drawn for a terminal

    out = ["# CLI reference", "", "Generated from the typer apps: each command's `--help`, as the terminal prints it.", ""]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=100, max_content_width=100)
        out.extend([f"{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`", "", "```text", command.get_help(ctx), "```", ""])
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(typer.main.get_command(app), ["maxfl"], None)
    out += ["## Other console scripts", "",
            "`maxfl-supernode` (a plant's SuperNode: Flower's `flower-supernode` with the plant's node config checked first), "
            "`maxfl-warm-exec` (the plant's app executor), `maxfl-superexec` and `maxfl-serverapp` (the anchor's executor, "
            "which runs allowed ServerApps only) take Flower's own flags; `maxfl federation superlink` starts them.", ""]
    return "\n".join(out)


def main() -> None:
    from fl_client.config import PlantConfig
    from fl_server.run.config import RunConfig

    pages = {
        "index.md": index_page(),
        "reference/run-config.md": model_page(
            RunConfig, "Run config reference",
            "The anchor's run config: `[tool.flwr.app.config]` in `pyproject.toml`, overridden with `flwr run --run-config` or "
            "`maxfl federate --set key=value`. Validated by `fl_server.run.config.RunConfig`; an unknown key or a value out of its "
            "limits stops the run before any plant trains."),
        "reference/node-config.md": model_page(
            PlantConfig, "Node config reference",
            "A plant's node config: `maxfl-supernode --node-config 'plant-id=\"..\" data-dir=\"..\" ...'`, or the `node-config.toml` "
            "that `maxfl plant join` writes. Validated by `fl_client.config.PlantConfig` before the SuperNode starts."),
        "reference/cli.md": cli_page(),
    }
    for name, text in pages.items():
        with mkdocs_gen_files.open(name, "w") as fh:
            fh.write(text)


main()
