"""The ``dglmm`` command.

Subcommands: ``fit``, ``sample``, ``compare``, ``prepare``, ``simulate``, ``predict``,
``plot``.  Any
error a user can cause prints one line ``dglmm: error: ...`` and exits with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from ._version import __version__
from .errors import DglmmError

EXIT_USAGE = 2



def _nodes(text: str):
    """``--n-agq``: a positive integer or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nodes or 'auto', not {text!r}"
                                         ) from None


def _levels(text: str) -> list:
    """``--response-levels a,b,c``: whole numbers as numbers (they match integer columns)."""
    out: list = []
    for item in (t.strip() for t in text.split(",")):
        try:
            out.append(int(item))
        except ValueError:
            try:
                out.append(float(item))
            except ValueError:
                out.append(item)
    return out

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it is None or False (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dglmm`` command (also used by tests)."""
    parser = argparse.ArgumentParser(
        prog="dglmm", formatter_class=_HelpFormatter,
        description="Generalized linear mixed models fitted by adaptive Gauss-Hermite "
        "quadrature on Dask.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"dglmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name, **kwargs):  # every subcommand shows its defaults
        return _add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    c = sub.add_parser("compare", help="likelihood-ratio tests of nested fits (lme4's anova)",
                       description="Compare saved fits (JSON results of `dglmm fit --output`) "
                       "of the same data: one row per fit in the order given, each tested "
                       "against the one before (lme4's anova()).")
    c.add_argument("results", nargs="+", help="two or more result JSON files, smaller first")

    f = sub.add_parser("fit", help="fit a model", description="Fit a GLMM and print its summary.")
    f.add_argument("data", help="Parquet file/directory/glob, CSV file(s), or prepared data")
    f.add_argument("--formula", default=None,
                   help="lme4 formula, e.g. 'y ~ x + (1 + x | g)' (or HLM's equations: --level1)")
    _add_hlm_arguments(f)
    f.add_argument("--family", default="binomial",
                   help="binomial, poisson, gaussian, nbinom2, nbinom1, gamma, beta or ordinal")
    f.add_argument("--response-levels", default=None, type=_levels,
                   help="ordinal: the response's categories, lowest first, e.g. low,mid,high "
                        "(default: the values in natural order)")
    f.add_argument("--link", default=None, help="link (default: the family's canonical link)")
    f.add_argument("--n-agq", type=_nodes, default=1,
                   help="quadrature nodes per dimension, or 'auto' (each group its own)")
    f.add_argument("--method", default="newton",
                   help="newton (default), em, em-newton, pql1, pql2, mql1, mql2 or npml "
                        "(docs/methods.md)")  # fmt: skip
    f.add_argument("--masses", default=None,
                   help="--method npml: number of mass points, or 'auto'")
    f.add_argument("--laplace-order", type=int, default=1,
                   help="with --n-agq 1: 2 or 3 adds higher-order terms to Laplace")
    f.add_argument("--pql-scale", choices=("fixed", "estimated"), default="fixed",
                   help="PQL/MQL: the working model's scale held at 1 (default) or estimated "
                        "(as MASS::glmmPQL)")  # fmt: skip
    ml = f.add_mutually_exclusive_group()
    ml.add_argument("--reml", dest="reml", action="store_const", const=True, default=None,
                    help="gaussian: restricted maximum likelihood (the default, as lmer)")
    ml.add_argument("--ml", dest="reml", action="store_const", const=False,
                    help="gaussian: maximum likelihood")
    f.add_argument("--design-dtype", choices=("float64", "float32"), default="float64",
                   help="storage of the designs on the workers: float32 halves their memory "
                        "(the kernels accumulate in float64); default float64")  # fmt: skip
    f.add_argument("--trials", default=None, help="binomial trials column")
    f.add_argument("--offset", default=None, help="offset column")
    f.add_argument("--weights", default=None, help="prior weights column")
    f.add_argument("--missing", choices=("error", "drop"), default="error",
                   help="rows with missing values: stop with an error (default) or drop them")
    f.add_argument("--output", default=None, help="write the result as JSON here")
    f.add_argument("--random-effects", default=None,
                   help="write per-group random-effect predictions as Parquet here (nested "
                   "levels: one dataset per level, DIR/<level>/)")
    f.add_argument("--scheduler", default=None, help="Dask scheduler address tcp://HOST:8786")
    f.add_argument("--scheduler-file", default=None, help="Dask scheduler file")
    f.add_argument("--workers", "--n-workers", dest="workers", type=int, default=None,
                   help="workers of the embedded local cluster (default: the number of cores; "
                   "Python: n_workers=)")
    f.add_argument("--local-processes", action="store_true",
                   help="the local cluster's workers are processes (default: threads of this "
                   "process; the compiled kernels release the GIL)")
    f.add_argument("--partitions", "--npartitions", dest="partitions", type=int, default=None,
                   help="partitions of the data (default: as read, or one per input file; "
                   "Python: npartitions=)")
    f.add_argument("--in-process", action="store_true", help="fit in this process, no Dask")
    f.add_argument("--checkpoint", default=None, help="checkpoint file (JSON)")
    f.add_argument("--resume", action="store_true", help="resume from --checkpoint")
    f.add_argument("--max-iter", type=int, default=100, help="Newton iterations per stage")
    f.add_argument("--quiet", action="store_true", help="no progress lines")
    f.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs even if they are not dglmm outputs")
    f.add_argument("--allow-python-formulas", action="store_true",
                   help="let the formula call any Python code (trusted formulas only)")
    _add_tls_arguments(f)

    _add_sample_parser(sub)

    p = sub.add_parser("prepare", help="write data partitioned by group for repeated fits",
                       description="Write the data partitioned by the top grouping level.")
    p.add_argument("data", help="Parquet file/directory/glob or CSV file(s) to partition")
    p.add_argument("out", help="output directory (new, or one dglmm prepared before)")
    p.add_argument("--group", default=None,
                   help="top grouping column (e.g. subscriber, or region for calls in "
                   "subscribers in regions); not needed with --formula")
    p.add_argument("--formula", default=None,
                   help="the model formula: the top grouping level is inferred from it (and "
                   "from the data when the formula does not decide it)")
    p.add_argument("--partitions", "--npartitions", dest="partitions", type=int, default=None,
                   help="output files (default: one per worker, or one per 2M rows if more)")
    p.add_argument("--in-process", action="store_true",
                   help="prepare in this process (Dask's local threads), no cluster")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address tcp://HOST:8786")
    p.add_argument("--scheduler-file", default=None, help="Dask scheduler file")
    p.add_argument("--workers", "--n-workers", dest="workers", type=int, default=None,
                   help="workers of the embedded local cluster (default: the number of cores)")
    p.add_argument("--local-processes", action="store_true",
                   help="the local cluster's workers are processes (default: threads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory")
    _add_tls_arguments(p)

    s = sub.add_parser("simulate", help="simulate calls-within-subscribers data")
    s.add_argument("out", help="output directory (or a .parquet file)")
    s.add_argument("--subscribers", type=int, default=None,
                   help="number of subscribers (implied by --levels)")
    s.add_argument("--levels", default=None, metavar="[REGIONS,]ACCOUNTS,SUBSCRIBERS",
                   help="nest the subscribers: e.g. 20,25,10 = 20 regions, 25 accounts per "
                   "region, 10 subscribers per account (two numbers: accounts, subscribers "
                   "per account)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--calls-per-subscriber", type=float, default=20.0,
                   help="mean calls per subscriber (Poisson)")
    s.add_argument("--effects", default=None,
                   help="also write the true random effects here (with --levels: a directory "
                   "of one Parquet file per level)")  # fmt: skip
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that dglmm did not write")

    pr = sub.add_parser("predict", help="predict from a fitted result")
    pr.add_argument("result", help="result JSON written by dglmm fit --output")
    pr.add_argument("data", help="the rows to predict: a Parquet or CSV file, a directory or "
                    "a glob (predicted partition by partition)")
    pr.add_argument("--output", required=True, help="Parquet file to write")
    pr.add_argument("--random-effects", default=None,
                    help="random-effects Parquet (from fit --random-effects; nested levels: its "
                    "directory) for conditional predictions of known groups")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace an existing output even if it is not a dglmm output")
    pr.add_argument("--allow-python-formulas", action="store_true",
                    help="let the result's formula call any Python code (trusted files only)")

    pl = sub.add_parser("plot", help="plots of a fitted result")
    pl.add_argument("result", help="result JSON written by dglmm fit --output")
    pl.add_argument("--random-effects", default=None,
                    help="random-effects Parquet (from fit --random-effects) for the "
                    "caterpillar plot")
    pl.add_argument("--data", default=None,
                    help="the fit's data: also draw residuals.png (quantile residuals)")
    pl.add_argument("--output", required=True, help="directory for the PNG files")
    pl.add_argument("--overwrite", action="store_true",
                    help="replace existing plot files even if they are not dglmm plots")
    return parser


def _add_hlm_arguments(parser: argparse.ArgumentParser) -> None:
    """HLM's equations in place of --formula (docs/hlm.md)."""
    parser.add_argument("--level1", default=None,
                        help="HLM level-1 model in place of --formula, e.g. 'mathach ~ ses'")
    parser.add_argument("--level2", action="append", default=[], metavar="'COEF: ~ W'",
                        help="a level-2 equation, e.g. 'Intercept: ~ sector' (one per "
                        "level-1 coefficient; the others get their gamma_p0 only)")
    parser.add_argument("--random", default=None, metavar="COEF,...",
                        help="the level-1 coefficients with a random effect at level 2, e.g. "
                        "Intercept,ses")
    parser.add_argument("--group", default=None, metavar="UNIT[,UNIT3]",
                        help="the level-2 unit column (three levels: level-2, then level-3 "
                        "unit column, e.g. school,district)")
    parser.add_argument("--level3", action="append", default=[], metavar="'BETA: ~ V'",
                        help="three levels: a level-3 equation of a level-2 coefficient, "
                        "e.g. 'Intercept: ~ v1'")
    parser.add_argument("--random3", default=None, metavar="BETA,...",
                        help="three levels: the level-2 coefficients with a random effect at "
                        "level 3")


_HLM_OPTIONS = ("level2", "random", "group", "level3", "random3")


def _hlm_equations(args) -> dict | None:
    """The keywords of :func:`dglmm.fit_hlm` from the command line; None with --formula."""
    given = [f"--{o}" for o in _HLM_OPTIONS if getattr(args, o)]
    if (args.formula is None) == (args.level1 is None):
        raise DglmmError("give --formula (an lme4 formula) or --level1 (HLM's equations, with "
                         "--level2, --random and --group), not both" if args.formula else
                         "fit needs --formula (an lme4 formula) or --level1 (HLM's equations)")
    if args.formula is not None:
        if given:
            raise DglmmError(f"{given[0]} goes with --level1, not --formula")
        return None
    from .hlm import hlm_spec, parse_equation, split_list

    out = {"level1": args.level1, "group": None, "random": None, "random3": None}
    for option in ("group", "random", "random3"):
        text = getattr(args, option)
        if text is not None:
            out[option] = split_list(text)
    if out["group"] is not None and len(out["group"]) == 1:
        out["group"] = out["group"][0]
    for option in ("level2", "level3"):
        equations = [parse_equation(text, f"--{option}") for text in getattr(args, option)]
        keys = [k for k, _ in equations]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise DglmmError(f"--{option} gives two equations for {twice!r}")
        out[option] = dict(equations) or None
    hlm_spec(**out)  # the equations checked before the outputs and the data
    return out


def _add_sample_parser(sub) -> None:
    b = sub.add_parser(
        "sample", help="Bayesian fit: NUTS over the global parameters (MCMC)",
        description="Sample the posterior of the fixed effects, random-effect sds and "
        "correlations and family parameters by NUTS, the random effects integrated out by "
        "Laplace or AGQ (docs/bayes.md); starts from the maximum-likelihood fit.")
    b.add_argument("data", help="Parquet file/directory/glob, CSV file(s), or prepared data")
    b.add_argument("--formula", required=True, help="lme4 formula, e.g. 'y ~ x + (1 | g)'")
    b.add_argument("--family", default="binomial",
                   help="binomial, poisson, gaussian, nbinom2, nbinom1, gamma, beta or ordinal")
    b.add_argument("--link", default=None, help="link (default: the family's canonical link)")
    b.add_argument("--response-levels", default=None, type=_levels,
                   help="ordinal: the response's categories, lowest first")
    b.add_argument("--n-agq", type=int, default=1,
                   help="quadrature nodes per dimension (1: Laplace)")
    b.add_argument("--draws", type=int, default=1000, help="draws per chain after warm-up")
    b.add_argument("--tune", type=int, default=1000, help="warm-up iterations per chain")
    b.add_argument("--chains", type=int, default=4, help="chains, advanced side by side")
    b.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    b.add_argument("--prior", action="append", default=[], metavar="TARGET=PRIOR",
                   help="a prior, repeatable: e.g. 'sd=half_normal(1)', "
                   "'duration=normal(0, 0.5)', 'corr=lkj(2)' (default: docs/bayes.md)")
    b.add_argument("--target-accept", type=float, default=0.8,
                   help="warm-up target of the mean acceptance statistic")
    b.add_argument("--output", required=True, help="write the posterior here (NetCDF)")
    b.add_argument("--summary-json", default=None, help="write the summary table here (JSON)")
    b.add_argument("--random-effects", default=None,
                   help="write per-group posterior draws and means of the random effects as "
                   "Parquet here (DIR/draws, DIR/summary)")
    b.add_argument("--random-effects-draws", type=int, default=100,
                   help="global draws for which the groups' effects are drawn")
    b.add_argument("--trials", default=None, help="binomial trials column")
    b.add_argument("--offset", default=None, help="offset column")
    b.add_argument("--weights", default=None, help="prior weights column")
    b.add_argument("--missing", choices=("error", "drop"), default="error",
                   help="rows with missing values: stop with an error (default) or drop them")
    b.add_argument("--scheduler", default=None, help="Dask scheduler address tcp://HOST:8786")
    b.add_argument("--scheduler-file", default=None, help="Dask scheduler file")
    b.add_argument("--workers", "--n-workers", dest="workers", type=int, default=None,
                   help="workers of the embedded local cluster (default: the number of cores)")
    b.add_argument("--local-processes", action="store_true",
                   help="the local cluster's workers are processes (default: threads)")
    b.add_argument("--partitions", "--npartitions", dest="partitions", type=int, default=None,
                   help="partitions of the data (default: as read, or one per input file)")
    b.add_argument("--in-process", action="store_true", help="sample in this process, no Dask")
    b.add_argument("--checkpoint", default=None, help="checkpoint file (JSON)")
    b.add_argument("--resume", action="store_true", help="resume from --checkpoint")
    b.add_argument("--checkpoint-every", type=int, default=100,
                   help="draws per chain between checkpoints")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs even if they are not dglmm outputs")
    b.add_argument("--allow-python-formulas", action="store_true",
                   help="let the formula call any Python code (trusted formulas only)")
    _add_tls_arguments(b)


def _cmd_sample(args) -> int:
    from .outputs import check_distinct, check_output_file
    from .priors import parse_prior_assignments

    priors = parse_prior_assignments(args.prior)
    check_output_file(args.output, kind="posterior", overwrite=args.overwrite, inputs=args.data)
    if args.summary_json:
        check_output_file(args.summary_json, kind="summary", overwrite=args.overwrite,
                          inputs=args.data)  # fmt: skip
    check_distinct([(args.output, False), (args.summary_json, False),
                    (args.checkpoint, False), (args.random_effects, True)])  # fmt: skip
    return _prestarting(args, lambda: _sample_and_report(args, priors))


def _sample_and_report(args, priors) -> int:
    import json

    from .api import IN_PROCESS
    from .mcmc import sample
    from .outputs import write_text_atomic

    result = sample(
        args.formula, args.data, family=args.family, link=args.link, n_agq=args.n_agq,
        trials=args.trials, offset=args.offset, weights=args.weights,
        client=IN_PROCESS if args.in_process else None, priors=priors, draws=args.draws,
        tune=args.tune, chains=args.chains, seed=args.seed, target_accept=args.target_accept,
        checkpoint=args.checkpoint, resume=args.resume, checkpoint_every=args.checkpoint_every,
        random_effects_output=args.random_effects,
        random_effects_draws=args.random_effects_draws, progress=not args.quiet,
        overwrite=args.overwrite, missing=args.missing, scheduler=args.scheduler,
        scheduler_file=args.scheduler_file, n_workers=args.workers,
        local_processes=args.local_processes, npartitions=args.partitions,
        allow_python_in_formulas=args.allow_python_formulas, security=_security(args),
        response_levels=args.response_levels,
    )  # fmt: skip
    print(result)
    result.to_netcdf(args.output, overwrite=True)
    print(f"\nposterior written to {args.output}", file=sys.stderr)
    if args.summary_json:
        write_text_atomic(args.summary_json, json.dumps(result.summary_records(), indent=1))
        print(f"summary written to {args.summary_json}", file=sys.stderr)
    return 0


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca-file", default=None,
                        help="CA certificate of a TLS scheduler (tls://HOST:PORT)")
    parser.add_argument("--tls-cert", default=None, help="client certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="client private key (PEM)")


def _security(args) -> dict | None:
    """TLS options of the command line as the ``security=`` dict of :func:`dglmm.fit`."""
    given = {"ca_file": args.tls_ca_file, "cert": args.tls_cert, "key": args.tls_key}
    return given if any(given.values()) else None


def _cmd_fit(args) -> int:
    from .outputs import check_fit_outputs

    equations = _hlm_equations(args)
    if args.resume and not args.checkpoint:
        raise DglmmError("--resume needs --checkpoint PATH")
    # every output checked before the fit starts (and against each other), so that a bad
    # --output is not found only after the whole fit
    check_fit_outputs(args.data, checkpoint=args.checkpoint, resume=args.resume,
                      random_effects=args.random_effects, output=args.output,
                      overwrite=args.overwrite)  # fmt: skip
    return _prestarting(args, lambda: _fit_and_report(args, equations))


def _prestarting(args, run):
    """``run()`` with the embedded cluster started beforehand when it will be used: the
    workers start (and load the kernels) while this process imports the design code and
    reads the formula; the fit's (or sampler's) connect() takes the cluster over."""
    if not _embedded_cluster(args):
        return run()
    from .dask_driver import cluster

    cluster.prestart(args.workers, processes=args.local_processes)
    try:
        return run()
    finally:
        cluster.discard_prestarted()


def _embedded_cluster(args) -> bool:
    """Whether this fit will start the embedded local cluster (not for a local data path
    that does not exist: that error comes at once)."""
    data = str(args.data)
    missing = "://" not in data and not any(c in data for c in "*?[") and not os.path.exists(data)
    return not (args.in_process or args.scheduler or args.scheduler_file or missing
                or os.environ.get("DASK_SCHEDULER_ADDRESS")
                or (args.workers is not None and args.workers < 1))  # fmt: skip


def _fit_and_report(args, equations: dict | None) -> int:
    from .api import IN_PROCESS, fit

    client = IN_PROCESS if args.in_process else None
    options = dict(
        family=args.family, link=args.link, n_agq=args.n_agq,
        trials=args.trials, offset=args.offset, weights=args.weights, client=client,
        missing=args.missing, scheduler=args.scheduler, scheduler_file=args.scheduler_file,
        n_workers=args.workers, npartitions=args.partitions, checkpoint=args.checkpoint,
        resume=args.resume, max_iter=args.max_iter, progress=not args.quiet,
        random_effects_output=args.random_effects, overwrite=args.overwrite,
        allow_python_in_formulas=args.allow_python_formulas, security=_security(args),
        response_levels=args.response_levels, method=args.method, masses=args.masses,
        pql_scale=args.pql_scale, laplace_order=args.laplace_order, reml=args.reml,
        design_dtype=args.design_dtype, local_processes=args.local_processes,
    )  # fmt: skip
    if equations is None:
        result = fit(args.formula, args.data, **options)
    else:
        from .hlm import fit_hlm

        result = fit_hlm(data=args.data, **equations, **options)
    summary = result.summary()
    print(summary)
    n_dropped = int(getattr(result, "n_dropped", 0) or 0)
    if n_dropped and "dropped" not in summary:
        print(f"\nDropped {n_dropped} of {result.n_obs + n_dropped} rows with missing or "
              "non-finite values (--missing drop).")  # fmt: skip
    if args.output:
        result.to_json(args.output, overwrite=args.overwrite)
        print(f"\nresult written to {args.output}", file=sys.stderr)
    return 0 if result.converged else 1


def _cmd_compare(args) -> int:
    from .compare import anova, format_table
    from .results import FitResult

    if len(args.results) < 2:
        raise DglmmError("compare needs two or more result files")
    fits = [FitResult.from_json(path) for path in args.results]
    names = [os.path.splitext(os.path.basename(path))[0] for path in args.results]
    if len(set(names)) != len(names):
        names = [f"model{i + 1}" for i in range(len(fits))]
    table = anova(*fits, names=names)
    print(format_table(table))
    return 0


def _cmd_prepare(args) -> int:
    from . import dask_driver
    from .outputs import check_output_dataset

    if args.group is None and args.formula is None:
        raise DglmmError("prepare needs --group COLUMN (the top grouping level) or --formula")
    if args.formula is not None:  # a bad formula is reported before a cluster is started
        from .formula import parse_formula

        parsed = parse_formula(args.formula)
        dask_driver.data.check_group_matches(parsed, args.group, parsed.group)
    # before a cluster is started: the output directory may be (re)written
    check_output_dataset(args.out, kind="prepared", overwrite=args.overwrite, inputs=args.data,
                         replace_own=False)  # fmt: skip
    import time

    t0 = time.perf_counter()
    if not args.quiet:
        where = "in this process" if args.in_process else (
            f"on {args.workers or 'the'} local workers" if not (args.scheduler or
                                                                args.scheduler_file)
            else "on the Dask cluster")  # fmt: skip
        print(f"dglmm: preparing {args.data!r} into {args.out!r} {where} (reading, grouping "
              "by the top level, writing)", file=sys.stderr, flush=True)  # fmt: skip
    if args.in_process:
        info = dask_driver.prepare(args.data, args.out, args.group, npartitions=args.partitions,
                                   handle=None, overwrite=args.overwrite,
                                   formula=args.formula)  # fmt: skip
    else:
        with dask_driver.connect(scheduler=args.scheduler, scheduler_file=args.scheduler_file,
                                 n_workers=args.workers, security=_security(args),
                                 processes=args.local_processes) as handle:
            info = dask_driver.prepare(args.data, args.out, args.group,
                                       npartitions=args.partitions, handle=handle,
                                       overwrite=args.overwrite, formula=args.formula)
    if not args.quiet:
        print(f"dglmm: prepared in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    top = f" of {info['group']!r}" if args.group is None else ""
    print(f"prepared {info['n_rows']} rows of {info['n_groups']} groups{top} in "
          f"{info['n_files']} files under {args.out}")  # fmt: skip
    return 0


def _cmd_simulate(args) -> int:
    from .simulate import parse_levels, simulate_to_parquet

    levels = None if args.levels is None else parse_levels(args.levels)
    if args.subscribers is None and levels is None:
        raise DglmmError("give --subscribers N, or --levels REGIONS,ACCOUNTS,SUBSCRIBERS")
    truth = simulate_to_parquet(
        args.out, args.subscribers, levels=levels, seed=args.seed,
        calls_per_subscriber=args.calls_per_subscriber, effects_path=args.effects,
        overwrite=args.overwrite,
    )  # fmt: skip
    if levels is None:
        print(f"wrote {truth['n_rows']} calls of {truth['n_subscribers']} subscribers to "
              f"{args.out}")  # fmt: skip
    else:
        groups = ", ".join(f"{n} {name}s" for name, n in truth["n_groups"].items())
        print(f"wrote {truth['n_rows']} calls of {groups} to {args.out}")
        print(f"true model (nested form): {truth['formula_nested']}")
    print(f"true model: {truth['formula']}")
    return 0


def _cmd_predict(args) -> int:
    from .predict import predict_to_parquet

    n = predict_to_parquet(args.result, args.data, args.output,
                           random_effects=args.random_effects, overwrite=args.overwrite,
                           allow_python_in_formulas=args.allow_python_formulas)  # fmt: skip
    print(f"wrote {n} predictions to {args.output}")
    return 0


def _cmd_plot(args) -> int:
    from .plots import plot_result

    paths = plot_result(args.result, args.output, random_effects=args.random_effects,
                        overwrite=args.overwrite, data=args.data)
    for p in paths:
        print(p)
    return 0


COMMANDS = {
    "fit": _cmd_fit,
    "sample": _cmd_sample,
    "compare": _cmd_compare,
    "prepare": _cmd_prepare,
    "simulate": _cmd_simulate,
    "predict": _cmd_predict,
    "plot": _cmd_plot,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dglmm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("DGLMM_DEBUG"))
    # warnings as "dglmm: warning: ..." lines; restored afterwards for callers of main()
    saved_format = warnings.formatwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", category=UserWarning)
            warnings.formatwarning = lambda msg, cat, *a, **k: f"dglmm: warning: {msg}\n"
            return _run(args, debug)
    finally:
        warnings.formatwarning = saved_format


def _run(args, debug: bool) -> int:
    """Run the subcommand; DglmmError and the like become one ``dglmm: error:`` line."""
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("dglmm: interrupted", file=sys.stderr)
        return 130
    except (DglmmError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        if debug:
            traceback.print_exc()
        print(f"dglmm: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - last line of defence for batch jobs
        if debug:
            traceback.print_exc()
        else:
            print(f"dglmm: error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                  "(run with --debug for the traceback and please report it)",
                  file=sys.stderr)  # fmt: skip
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (readers and Dask put newlines in theirs)."""
    return " ".join(str(exc).split())


def console_main() -> None:  # pragma: no cover - exits the process
    """The ``dglmm`` console script: :func:`main`, then an exit without the interpreter's
    teardown of a process that holds compiled kernels and the data (~0.5 s after a 1M-row
    fit).  Everything the command writes is written, atomically and closed, before
    :func:`main` returns; the standard streams are flushed here."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
