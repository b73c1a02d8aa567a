"""The ``regfit`` command: routes a command line to its subcommand.

::

    regfit fit --config configs/mnist_l2.yaml [--regularization.strength=1e-3] [--optimizer.lr=0.1]
    regfit validate|test|predict --config FILE [--ckpt_path=…]
    regfit groups --config FILE [--plain]     # which parameter gets which penalty; no training
    regfit thin --config FILE --ckpt_path CKPT --out model.pt   # remove the units that are exactly zero
    regfit sweep SWEEP.yaml                    # a W&B sweep file, run locally and offline
    regfit report RUN_DIR [--out DIR]          # one page of plots of a CSV or W&B run

``fit``/``validate``/``test``/``predict`` are :class:`~regfit.lightning_cli.RegfitCLI`
(LightningCLI with a ``regularization:`` section); the others live in their own modules
(:mod:`regfit.groups`, :mod:`regfit.thin_command`, :mod:`regfit.sweep`, :mod:`regfit.report`). A user mistake (unknown penalty or mode,
negative λ, a selector matching nothing, a missing config file, …) ends the command with
exit code 2 and one paragraph on stderr (:mod:`regfit.errors`); ``--debug`` (or
``REGFIT_DEBUG=1``) shows the traceback instead. A command stopped by SIGTERM or Ctrl+C
exits 143 / 130 and says what it kept (:mod:`regfit.interrupts`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Sequence

from regfit.configfile import check_config_files
from regfit.errors import ENV_DEBUG, EXIT_USAGE, UsageError, check_config_given, format_error, is_user_error
from regfit.interrupts import Interrupted, stop_on_sigterm
from regfit.lightning_cli import RegfitCLI, RegfitSaveConfig, run_cli
from regfit.wandb_setup import configure_wandb, remove_stale_wandb_temp, wandb_credentials_found

# The names users and older scripts import from here (``from regfit.cli import run_cli``).
__all__ = ["main", "run_cli", "RegfitCLI", "RegfitSaveConfig", "UsageError", "check_config_given", "format_error",
           "is_user_error", "configure_wandb", "wandb_credentials_found"]


#: How to install what ``regfit sweep`` needs beyond regfit itself.
SWEEP_EXTRA = 'pip install -c constraints.txt -e ".[sweep]"'


def _sweep(argv: list[str]) -> int:
    try:
        module = importlib.import_module("regfit.sweep")
    except ModuleNotFoundError as exc:
        if exc.name != "regfit.sweep":
            raise
        raise UsageError("`regfit sweep` is not available in this version of regfit (no regfit.sweep module).") from None
    missing = [name for name in ("optuna", "matplotlib") if not _importable(name)]
    if missing:
        raise UsageError(
            f"`regfit sweep` needs {' and '.join(missing)}, which the plain install leaves out: install regfit's "
            f"`sweep` extra, `{SWEEP_EXTRA}` in a clone of regfit (or `pip install optuna matplotlib`)."
        )
    return int(module.main(argv) or 0)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


OVERVIEW = """regfit: weight regularization for PyTorch Lightning.

  regfit fit|validate|test|predict --config FILE [--section.key=value ...]
  regfit groups --config FILE [--plain]   which parameter gets which penalty (no training)
  regfit thin --config FILE --ckpt_path CKPT --out FILE
                                          save the model without its exactly-zero units
  regfit sweep SWEEP.yaml                 run a W&B sweep file locally, offline
  regfit report RUN_DIR                   one page of plots of a CSV or W&B run
  add --debug (or REGFIT_DEBUG=1) to see tracebacks

"""


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(OVERVIEW)
        if not argv:
            return EXIT_USAGE
    if argv and argv[0] == "groups":
        from regfit.groups import main as groups_main

        return groups_main(argv[1:])
    if argv and argv[0] == "thin":
        from regfit.thin_command import main as thin_main

        return thin_main(argv[1:])
    if argv and argv[0] == "sweep":
        return _sweep(argv[1:])
    if argv and argv[0] == "report":
        from regfit.report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        check_config_given(argv[0], argv[1:])
        check_config_files(argv[1:])
    run_cli(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``regfit`` console script. Returns the exit code (0 ok, 2 a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(ENV_DEBUG, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    remove_stale_wandb_temp()  # left by regfit commands that were killed
    try:
        with stop_on_sigterm():
            return _dispatch(argv)
    except Interrupted as exc:
        sys.stderr.write(f"regfit: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("regfit: stopped by SIGINT.\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one paragraph, bugs keep their traceback
        if debug or not is_user_error(exc):
            raise
        sys.stderr.write(f"regfit: error: {format_error(exc, argv)}\n(Run with --debug for the traceback.)\n")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
