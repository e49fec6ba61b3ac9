"""One flag style for every command: ``--num_images`` (diffusers' and the YAML keys' spelling),
with ``--num-images`` accepted as an alias everywhere and left out of ``--help``."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag once, in its documented spelling, and its default once: not when the help
    already says what the default is, not for switches, not when there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.nargs == 0  # store_true / store_false / version: the flag itself is the value
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden_aliases", ())
        if not hidden:
            return super()._format_action_invocation(action)
        shown = [s for s in action.option_strings if s not in hidden]
        original = action.option_strings
        action.option_strings = shown
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = original


def other_spelling(flag: str) -> str | None:
    """``--num_images`` <-> ``--num-images`` (None for flags with neither, or short flags)."""
    if not flag.startswith("--"):
        return None
    body = flag[2:]
    if "_" in body:
        return "--" + body.replace("_", "-")
    if "-" in body:
        return "--" + body.replace("-", "_")
    return None


class FlagParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose long flags answer to both spellings; the underscore one is documented.

    Sub-parsers made with ``add_subparsers().add_parser`` are ``FlagParser`` too.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        if not names or not names[0].startswith("-"):
            return super().add_argument(*names, **kwargs)
        documented = ["--" + n[2:].replace("-", "_") if n.startswith("--") else n for n in names]
        aliases = [other_spelling(n) for n in documented]
        aliases = [a for a in aliases if a and a not in documented]
        if "dest" not in kwargs and any(n.startswith("--") for n in documented):
            kwargs["dest"] = next(n for n in documented if n.startswith("--"))[2:]
        action = super().add_argument(*documented, *aliases, **kwargs)
        action.hidden_aliases = tuple(aliases)
        return action
