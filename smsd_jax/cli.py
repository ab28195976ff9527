r"""The command line of every stage: `smsd-jax` (installed) or `python -m launch.main` (checkout).

    smsd-jax --config=configs/quickstart.py --mode=simulate
    smsd-jax --config=configs/quickstart.py --mode=init --workdir=runs/q
    smsd-jax --config=configs/quickstart.py --mode=site --site=0 --workdir=runs/q
    smsd-jax --config=configs/quickstart.py --mode=server --workdir=runs/q
    smsd-jax --config=configs/quickstart.py --mode=downstream --workdir=runs/q

The server on several hosts (one process each; the workdir on a file system all of them see):
    smsd-jax --config=... --mode=server --workdir=... --distributed  # TPU pod, SLURM, Open MPI
    smsd-jax --config=... --mode=server --workdir=... --distributed \
        --coordinator=HOST0:1234 --num_processes=N --process_id=I   # any other cluster

The work directory's layout is `smsd_jax.layout.Layout`'s. Config values can be overridden
with --config.x.y=value, and a config takes variants after its path (`configs/x.py:tiny`).
Expected errors (a bad config, bad input, a damaged artifact) print one line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

# The stages of the method, the installed command's modes. The experiments (studies of the
# method: experiments/) add theirs when run from a checkout (`python -m launch.main`).
MODES = {
    "simulate": "the whole single round for every site on this machine, then a results table "
                "against a random body and raw pixels, and the report",
    "init": "consortium set-up: the frozen head from a secret key, the sites' split of the data",
    "site": "stage 1 at one site (--site): encode and encrypt its images into its payload, once",
    "server": "stage 2: masked sampling distillation over all payloads; exports the body",
    "downstream": "stage 3 at a site: linear probe, k-NN and fine-tuning of head + body + tail",
    "downstream_per_site": "stage 3 at every site on its own data: probes and fine-tuning on "
                           "its own labels, tested on the global test split and its own "
                           "held-out images",
    "report": "PNGs of the server's training curves and the downstream accuracies",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py"
                                          "[:variant,...]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where artifacts go (default: config.workdir).")
_SITE = flags.DEFINE_integer("site", 0, "Site id for --mode=site.")
_HEAD = flags.DEFINE_string("head", None, "Head folder (default: WORKDIR/consortium/head).")
_PAYLOADS = flags.DEFINE_list("payloads", None, "Payload folders for --mode=server "
                              "(default: every WORKDIR/payloads/site_*).")
_FINGERPRINT = flags.DEFINE_string(
    "head_fingerprint", None, "For --mode=site: the consortium's head fingerprint (printed by "
    "init); a head that does not match it is refused.")
_BODY = flags.DEFINE_string("body", None, "Body export for --mode=downstream "
                            "(default: WORKDIR/server/body).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run (one process "
                                 "per host) before using any device; for --mode=server.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "With --distributed: HOST:PORT of "
                                   "process 0 (default: detected on TPU pods, SLURM, Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: number of "
                                      "processes (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's "
                                   "rank, 0 to num_processes - 1 (default: detected).")


def _define_mode(experiments: dict) -> None:
    """`--mode`: a stage of `MODES`, or an experiment of `experiments` (name -> (what it runs,
    `fn(config, layout)`))."""
    described = {**MODES, **{name: what for name, (what, _) in experiments.items()}}
    elsewhere = "" if experiments else (
        " The experiments (privacy, study, curve, frontier, per_site_heads) run from a "
        "checkout: python -m launch.main.")
    flags.DEFINE_enum("mode", "simulate", list(described), "Which stage to run: " + "; ".join(
        f"{name}: {what}" for name, what in described.items()) + "." + elsewhere)


def run(argv, experiments: dict | None = None) -> None:
    """Checks the flags and the config, then runs the mode's stage or experiment."""
    # Imported here so that `--help` answers without loading JAX.
    from smsd_jax import (consortium, distributed, downstream, files, report, server, simulate,
                          site, validate)
    from smsd_jax.downstream import per_site
    from smsd_jax.layout import Layout

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
    mode = flags.FLAGS.mode
    if _DISTRIBUTED.value:  # before anything touches jax devices (check_config does)
        if mode != "server":
            raise app.UsageError("--distributed is for --mode=server")
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(flags.FLAGS[name].present for name in ("coordinator", "num_processes",
                                                    "process_id")):
        raise app.UsageError("--coordinator, --num_processes and --process_id need --distributed")
    validate.check_config(config)
    layout = Layout(_WORKDIR.value or config.workdir)
    head = _HEAD.value and files.as_path(_HEAD.value)
    if mode == "simulate":
        simulate.run_simulation(config, layout)
    elif mode == "init":
        consortium.set_up(config, layout)
    elif mode == "site":
        site.site_stage(config, layout, _SITE.value, head, _FINGERPRINT.value)
    elif mode == "server":
        server.run_server(config, _PAYLOADS.value, layout)
    elif mode == "downstream":
        downstream.downstream_stage(config, layout, head,
                                    _BODY.value and files.as_path(_BODY.value))
    elif mode == "downstream_per_site":
        per_site.evaluate_sites(config, layout)
    elif mode == "report":
        for path in report.draw_report(layout):
            print(f"report: {path}")
    else:
        experiments[mode][1](config, layout)


def _expected(error: BaseException | None):
    """The innermost `SMSDError` in the chain of causes of `error`, else None (config_flags
    re-raises a config's error with its traceback folded into the message: the inner one is
    the error as raised)."""
    from smsd_jax.errors import SMSDError

    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = error if isinstance(error, SMSDError) else found
        error = error.__cause__ or error.__context__
    return found


def _fail(error) -> None:
    print(f"error: {error}", file=sys.stderr)  # names the file or value and what to do
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a config that cannot load for an expected reason (its
    `get_config` raised an `SMSDError`, e.g. an unknown variant) is one line, exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if (cause := _expected(e)) is not None:
            _fail(cause)
        return app.parse_flags_with_usage(argv)  # absl's own message and usage


def _main(argv, experiments: dict) -> None:
    from smsd_jax.errors import SMSDError

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
    try:
        run(argv, experiments)
    except SMSDError as e:
        _fail(e)


def _config_root_on_path(argv: list[str]) -> None:
    """Lets a config file import its siblings (`from configs import base`) when it lives in a
    package folder, wherever `smsd-jax` is started from."""
    for i, arg in enumerate(argv):
        value = (arg.split("=", 1)[1] if arg.startswith("--config=") else
                 argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value:
            folder = Path(value.split(":", 1)[0]).absolute().parent
            if (folder / "__init__.py").exists() and str(folder.parent) not in sys.path:
                sys.path.insert(0, str(folder.parent))


def main(experiments: dict | None = None) -> None:
    """The `smsd-jax` console script; `python -m launch.main` adds the checkout's experiments
    (name -> (what it runs, `fn(config, layout)`))."""
    experiments = experiments or {}
    _define_mode(experiments)
    _config_root_on_path(sys.argv)
    # `--help` lists the flags of the program that runs (sys.argv[0]): these.
    for name in flags.FLAGS.get_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], name)
    app.run(lambda argv: _main(argv, experiments), flags_parser=_parse_flags)
