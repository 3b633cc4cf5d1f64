"""The `kvpager` command. Each subcommand lives in its own module, exposing
`add_arguments(parser)` and `run(args) -> int`; this file only wires them (imported lazily so
`kvpager --help` stays fast: no torch).

A user mistake never ends in a traceback: a bad flag is refused by argparse (the `type=` checks
of kvpager.cli_args), and a KVPagerError or OSError raised while a command runs is printed as
`kvpager <command>: error: <message>`; both exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from kvpager import __version__
from kvpager.errors import KVPagerError

# name -> (module, help)
COMMANDS = {
    "demo": ("kvpager.examples.deepseek_decode", "DeepSeek-style decode loop through the runtime"),
    "simulate": ("kvpager.runtime.simulate_cli", "simulate a continuous-batching workload (no GPU)"),
}
BENCHMARKS = {
    "tables": ("kvpager.benchmarks.tables", "block_table / cache_seqlens update cost per step"),
    "kernel": ("kvpager.benchmarks.kernel", "MLA decode kernel vs the GPU's measured ceilings"),
    "scheduler": ("kvpager.benchmarks.scheduler", "scheduler + table overhead per step"),
    "prefix": ("kvpager.benchmarks.prefix", "prefix-cache lookup + admission cost per request"),
}
FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _add(sub, name: str, module: str, help_: str) -> None:
    parser = sub.add_parser(name, help=help_, description=help_, formatter_class=FORMATTER)
    parser.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpager", formatter_class=FORMATTER,
        description="kvpager: paged latent KV cache and MLA decode for DeepSeek-style "
        "models — the demo, the workload simulator and the benchmarks.")
    parser.add_argument("--version", action="version", version=f"kvpager {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Import only the module the user asked for, so one subcommand's heavy imports
    # (matplotlib, transformers) never slow another down.
    wanted = argv[0] if argv else None
    for name, (module, help_) in COMMANDS.items():
        if wanted == name:
            _add(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_)
    bench = sub.add_parser("bench", help="benchmarks that print figures", formatter_class=FORMATTER)
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        if wanted == "bench" and len(argv) > 1 and argv[1] == name:
            _add(bench_sub, name, module, help_)
        else:
            bench_sub.add_parser(name, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    command = args.command + (f" {args.bench}" if args.command == "bench" else "")
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except (KVPagerError, OSError) as exc:
        print(f"kvpager {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
