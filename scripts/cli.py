"""The help format every script's command line uses (scripts/, benchmarks/, demo/)."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description keeps its line breaks (the examples in the scripts' docstrings); each option's default is
    shown once, unless it is None, False or already named in the help text; an option with several spellings
    (`--num_frames, --num-frames N`) names its value once."""

    def __init__(self, prog: str, **kwargs) -> None:
        # Room for "--num_frames, --num-frames N" before the help text, which then stays on its line.
        super().__init__(prog, **{"max_help_position": 34, **kwargs})

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0 or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"
