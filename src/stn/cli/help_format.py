"""`--help` rendered as written: four corrections to Typer's rich help screens, applied once when stn.cli.main loads.

Typer (0.29) draws help with Rich and by default reads every help text as Rich markup, so `pip install
'stn[report]'` printed as `pip install 'stn'` (`[report]` is a markup tag). It also shows a value type beside
every option, `<bool>` for flags that take no value; prints a required argument as `{checkpoint}` on the usage
line; and folds a long choice list at the column's edge, mid-name (`RT` / `S`). stn writes no markup in its
help, so here:
- help texts are escaped, so they print exactly as written;
- a flag shows no value; an option with a `metavar` shows it (`--cfg <job|hydra|all>`, whose value Typer
  cannot know: stn.cli.main reads it from the overrides);
- the usage line names arguments as Click does: `CHECKPOINT`, `[OVERRIDES]...`;
- a choice list longer than CHOICES_WIDTH shows the option's name (`<dataset>`), and its help ends with the
  choices, wrapped between words.
The patches replace Typer's methods on its own classes, so every command, present and future, gets them;
tests/test_cli.py checks each on the real help screens.
"""

from __future__ import annotations

import functools
from typing import Any

import typer.core
import typer.rich_utils

CHOICES_WIDTH = 24  # longest `<a|b|c>` choice list shown in the type column; longer ones go to the help text
_APPLIED = False


def _choices(param: Any) -> list[str] | None:
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or not descriptor.is_choice:
        return None
    return [str(choice) for choice in descriptor.choices or ()]


def _long_choices(param: Any) -> list[str] | None:
    choices = _choices(param)
    return choices if choices and len("|".join(choices)) > CHOICES_WIDTH else None


def apply() -> None:
    """Patch Typer once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    needed = [(typer.rich_utils, "_make_rich_text"), (typer.rich_utils, "_get_parameter_help"),
              (typer.rich_utils, "MARKUP_MODE_RICH"), (typer.core.TyperOption, "display_type"),
              (typer.core.TyperArgument, "_usage_display_name")]
    if not all(hasattr(owner, name) for owner, name in needed):
        return  # another Typer than the one this was written for: its own help, rather than a broken CLI
    from rich.markup import escape

    make_text = typer.rich_utils._make_rich_text

    @functools.wraps(make_text)
    def literal_text(*, text: str, style: str = "", markup_mode: Any) -> Any:
        if markup_mode == typer.rich_utils.MARKUP_MODE_RICH:
            text = escape(text)
        return make_text(text=text, style=style, markup_mode=markup_mode)

    typer.rich_utils._make_rich_text = literal_text

    display_type = typer.core.TyperOption.display_type

    def option_type(self: Any, ctx: Any) -> str | None:
        if self.metavar:
            return f"<{self.metavar}>"
        if self.is_flag and not self.count:
            return None  # a flag takes no value
        if _long_choices(self):
            return f"<{self.name}>"
        return display_type(self, ctx)

    typer.core.TyperOption.display_type = option_type
    typer.core.TyperOption.display_type_rich = option_type

    parameter_help = typer.rich_utils._get_parameter_help

    @functools.wraps(parameter_help)
    def help_with_choices(*, param: Any, ctx: Any, markup_mode: Any) -> Any:
        choices = _long_choices(param) if isinstance(param, typer.core.TyperOption) and not param.metavar else None
        if choices and "one of:" not in (param.help or ""):
            param.help = f"{(param.help or '').rstrip()} One of: {', '.join(choices)}."
        return parameter_help(param=param, ctx=ctx, markup_mode=markup_mode)

    typer.rich_utils._get_parameter_help = help_with_choices

    def usage_name(self: Any) -> str:
        name = (self.metavar or self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return f"{name}..." if self.nargs != 1 else name

    typer.core.TyperArgument._usage_display_name = usage_name
