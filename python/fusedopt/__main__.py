"""`python -m fusedopt <command>`: the main job (`demo`) and what this install can run (`info`).

Without a command it prints the commands and exits: the demo runs for minutes, so it starts only
when asked for by name.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import textwrap

import torch

import fusedopt

PROG = "python -m fusedopt"
COMMANDS = {
    "demo": "the main job: train a small GPT with AdamW and with AdamC and plot AdamW's "
            "end-of-training gradient-norm surge (defaults: about 4.5 min on a 2-core CPU; "
            "see demo --help)",
    "info": "versions, GPU, and which optimizer backends this install can run (is the CUDA "
            "extension fusedopt._C built?)",
}
BUILD_HOW = ("to build it: a CUDA toolkit (nvcc on PATH, or CUDACXX / CUDA_HOME) and cmake, "
             "then `pip install -e .` again without FUSEDOPT_SKIP_CUDA_BUILD")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="fusedopt: fused GPU optimizer steps for PyTorch (AdamW/AdamC, SGD/SGDC, "
                    "Lion/LionC). The optimizers are a library (import fusedopt); this command "
                    "line runs the demo and reports the install.",
        epilog=f"`{PROG} <command> --help` shows a command's options.")
    p.add_argument("--version", action="version", version=f"fusedopt {fusedopt.__version__}")
    commands = p.add_subparsers(dest="command", title="commands", metavar="<command>")
    for name, help_text in COMMANDS.items():
        # These parsers only list the commands: each command parses its own arguments.
        commands.add_parser(name, help=help_text, add_help=False)
    return p


def extension_status() -> tuple[bool, str]:
    """(whether fusedopt._C imports, one line saying so and, if not, why and how to build it)."""
    if importlib.util.find_spec("fusedopt._C") is None:
        return False, ("not built (the install found no nvcc, or FUSEDOPT_SKIP_CUDA_BUILD was "
                       f"set); {BUILD_HOW}")
    try:
        importlib.import_module("fusedopt._C")
    except ImportError as err:
        return False, f"present but does not import ({err}); {BUILD_HOW}"
    return True, "built (runs CUDA tensors when a GPU is visible)"


def info() -> None:
    print(f"fusedopt {fusedopt.__version__} ({fusedopt.__path__[0]})")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"torch {torch.__version__}, GPU: {gpu}")
    print("backends:")
    print("  reference  PyTorch, any device (what CPU tensors run on)")
    if importlib.util.find_spec("triton") is None:
        print("  triton     not installed (pip install triton)")
    else:
        print(f"  triton     triton {importlib.import_module('triton').__version__}")
    print(textwrap.fill(f"fusedopt._C {extension_status()[1]}", width=99,
                        initial_indent="  cuda       ", subsequent_indent=" " * 13))
    from fusedopt.engine import backends

    for feature, names in backends.FEATURE_BACKENDS.items():
        print(f"{feature} runs on: {', '.join(names)}")
    if torch.cuda.is_available():
        chosen = backends.resolve("auto", torch.device("cuda"), [torch.float32])
        print(f"backend='auto' runs CUDA tensors on: {chosen}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "demo":
        from fusedopt import demo

        demo.main(args[1:], prog=f"{PROG} demo")
        return 0
    if args and args[0] == "info":
        argparse.ArgumentParser(prog=f"{PROG} info", description=COMMANDS["info"]).parse_args(
            args[1:])
        info()
        return 0
    # No command, --help, --version or an unknown command (argparse exits for the last three).
    p = parser()
    p.parse_args(args)
    p.print_help()
    built, status = extension_status()
    if not built:
        print("\n" + textwrap.fill(f"note: the CUDA extension fusedopt._C is {status}", width=79))
    return 0


if __name__ == "__main__":
    sys.exit(main())
