"""The ``moeconv`` command line.

Each command lives in its own module under ``moeconv.commands`` and is imported
only when it runs, so ``moeconv --help`` and light commands such as ``verify``
start without paying for torch and transformers.
"""

from __future__ import annotations

import importlib

import click

#: command name -> (module under moeconv.commands, one-line help shown by ``moeconv --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert", "Quantize a Hugging Face MoE checkpoint into the moeconv format."),
    "plan": ("plan", "Show the per-expert bit allocation that convert would use, without writing."),
    "inspect": ("inspect", "Show the schemes, bits and sizes of a converted model."),
    "verify": ("verify", "Check a converted model's structure and every checksum."),
    "dequantize": ("dequantize", "Write a plain BF16 Hugging Face checkpoint from a converted one."),
    "eval": ("eval", "Perplexity of an original or converted model on a text file."),
    "generate": ("generate", "Generate text from an original or converted model."),
    "upload": ("upload", "Upload a converted model to the Hugging Face Hub."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"moeconv.commands.{COMMANDS[name][0]}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeconv")
def main() -> None:
    """moeconv: make Mixture-of-Experts models small enough to serve.

    Routed experts are quantized one by one (INT2/3/4/8, NF4/FP4 with double
    quantization, MXFP4; RTN, GPTQ or AWQ), routers stay BF16, and the result is
    a documented safetensors-based format that the loaders read back.
    """
