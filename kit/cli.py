"""The ``compkit`` command line.

Exit codes
----------
0  success (``check``: every frozen input unchanged; ``gate``: accepted)
1  a frozen input changed (``check``, ``candidates``, ``run``; the report says which);
   ``gate``: rejected (a rule failed: its whole CI is outside the budget)
2  bad input: study, eval set, model source, run folder (the message names it); evidence
   changed after kit wrote it (a stored output, an artifact or the verdict deleted, added or
   edited: ``check``, ``gate``, ``run``; the message names the file); ``run``: a stage failed
   (the message names the kit call and where it failed); ``gate``: the run is missing,
   unjudged, unfinished or frozen without a budget
3  ``gate``: inconclusive (no rule failed, but one is undecided or not measured)
4  ``gate``: accepted with routing rule (the candidate alone is not accepted, but the routed
   system of stage 6, candidate + router + fallback, passes every rule: deploy it only with
   the printed rule)

``compkit monitor RUN --log FILE`` exits 0 when the deployed router matches what stage 6
measured and 1 when any check drifted (fallback rate, rule agreement, confidence
distribution, accuracy on labelled requests).

``compkit gate runs/NAME`` without ``--candidate`` passes (0) only when every candidate is
accepted; 4 when every candidate is accepted alone or with its routing rule; otherwise it
exits 1 when any candidate is rejected, else 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kit.errors import CompkitError


def _cmd_validate(args: argparse.Namespace) -> int:
    from kit.evalset import label_shares, summary
    from kit.validate import validate_study

    checked = validate_study(args.study)
    study, eval_set = checked.study, checked.eval_set
    print(f"study {study.name!r}: valid")
    print(
        f"eval set {study.resolve(study.eval_set.path)}: {len(eval_set)} items, "
        f"sha256 {eval_set.sha256[:16]}"
    )
    print(summary(eval_set).to_string(index=False))
    shares = label_shares(eval_set)
    declared = study.eval_set.rare_labels
    if not shares.empty:
        if declared is None:
            rare = shares[shares["share"] < study.eval_set.rare_label_threshold]
            head = f"rare labels (< {study.eval_set.rare_label_threshold:.0%})"
        else:
            rare = shares[shares["label"].isin(declared)]
            head = "rare labels (declared rare in production: eval_set.rare_labels)"
        print(
            f"{head}: "
            + (", ".join(f"{r.label} ({r.share:.1%})" for r in rare.itertuples()) or "none")
        )
    for name, found in checked.sources.items():
        print(f"model {name}: {found}")
    if checked.execution:
        print(f"execution: {checked.execution}")
    return 0


def _cmd_new(args: argparse.Namespace) -> int:
    from kit.scaffold import new_study

    made = new_study(
        args.name,
        eval_set=args.eval_set,
        baseline=args.baseline,
        runtime=args.runtime,
        folder=args.dir,
        task=args.task,
    )
    print(f"wrote {', '.join(str(f) for f in made.files)}")
    _cmd_validate(argparse.Namespace(study=str(made.study)))
    print(
        f"\nnext: review {made.folder / 'budget.yaml'} (write the rules BEFORE any result "
        f"exists; they are frozen with the baseline) and the candidates in {made.study}, then"
    )
    print(f"  {made.next_command}")
    return 0


def _cmd_freeze(args: argparse.Namespace) -> int:
    from kit.stages.freeze import freeze_baseline

    manifest = freeze_baseline(args.study, args.out, progress=not args.quiet)
    _print_freeze_summary(manifest, Path(args.out))
    return 0


def _print_freeze_summary(manifest, out: Path) -> None:
    scores = manifest.scores_frame()
    main = scores[(scores["task"] == "all") & (scores["metric"].isin(["accuracy", "error_rate"]))]
    per_task = scores[(scores["task"] != "all") & (scores["metric"] == "accuracy")]
    print(
        f"\nfroze baseline {manifest.outputs.model!r} of study {manifest.study!r}: "
        f"{manifest.outputs.items} items x {manifest.outputs.repeats} repeat(s) "
        f"in {manifest.timings['wall_s']:.0f}s"
    )
    for r in main.itertuples():
        print(f"  {r.metric}: {r.value:.3f} (n={r.n})")
    for r in per_task.itertuples():
        print(f"  accuracy[{r.task}]: {r.value:.3f} (n={r.n})")
    print(f"manifest: {out / 'manifest.json'}")


def _cmd_check(args: argparse.Namespace) -> int:
    from kit.integrity import IntegrityError, verify_run
    from kit.run import Run
    from kit.stages.freeze import check_frozen
    from kit.verdicts import VERDICT_FILE, VerdictReport

    report = check_frozen(args.run)
    print(report.render())
    run = Run.open(args.run)
    try:
        verify_run(run)
        if (run.root / VERDICT_FILE).is_file():
            VerdictReport.load(run.root)  # the seal and every evidence file's sha256
    except IntegrityError as exc:
        print(f"\nEVIDENCE CHANGED: {exc}")
        return exc.exit_code
    print("evidence: every stored output, artifact and the verdict match their records")
    return 0 if report.ok else 1


def _cmd_candidates(args: argparse.Namespace) -> int:
    from kit.stages.candidates import run_candidates

    run = Path(args.run)
    if args.study is not None:
        _ensure_same_study(run, Path(args.study))
    summary = run_candidates(
        run,
        only=args.only,
        force=args.force,
        progress=not args.quiet,
        ray=args.ray,
        workers=args.workers,
    )
    print(summary.to_string(index=False) if not summary.empty else "no finished candidates")
    print(f"outcomes: {run / 'outcomes.parquet'}")
    return 0


def _ensure_same_study(run: Path, study: Path) -> None:
    from kit.stages.freeze import BaselineManifest

    frozen_from = Path(BaselineManifest.load(run).inputs.study_file).resolve()
    if frozen_from != study.resolve():
        raise CompkitError(f"{run} was frozen from {frozen_from}, not {study}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from kit.pipeline import run_pipeline
    from kit.resources import demo_dir

    result = run_pipeline(
        demo_dir() / "study.yaml",
        args.out,
        force=args.force,
        progress=not args.quiet,
        verbose=args.verbose,
    )
    _print_pipeline_result(result)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kit.pipeline import run_pipeline

    result = run_pipeline(
        args.study,
        args.out,
        stages=args.stage,
        force=args.force,
        progress=not args.quiet,
        verbose=args.verbose,
    )
    _print_pipeline_result(result)
    return 0


def _cmd_serve_bench(args: argparse.Namespace) -> int:
    from kit.pipeline import run_pipeline

    run = Path(args.out)
    _ensure_same_study(run, Path(args.study))  # also: the run must be frozen
    params = {"require_served": True, "models": ",".join(args.model or []), "force": args.force}
    result = run_pipeline(
        args.study,
        run,
        stages=["serving"],
        progress=not args.quiet,
        parameters={"serving": params},
    )
    _print_serving_result(result.run_dir)
    print(f"notebook: {result.run_dir / 'notebooks' / '05_serving.ipynb'}")
    return 0


def _print_serving_result(run: Path) -> None:
    import pandas as pd

    from kit.serving.tables import summary
    from kit.stages.serving import ServingReport

    report = ServingReport.load(run)
    for rec in report.models:
        why = f": {rec.reason.splitlines()[0]}" if rec.reason else ""
        print(f"  {rec.model} ({rec.deploy}): {rec.status}, {len(rec.profiles)} profiles{why}")
    if report.client:
        print(f"  client ceiling: {report.client['ceiling_rps']:.0f} requests/s")
    tables = {
        n: pd.read_parquet(run / "tables" / f"serving_{n}.parquet")
        for n in ("latency", "throughput")
    }
    table = summary(tables)
    if not table.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.round(2).to_string(index=False))
    if report.partial:
        print("serving: PARTIAL results: a model failed or stopped early (see above)")
    print(f"evidence: {run / 'tables' / 'serving_evidence.parquet'}")


def _print_pipeline_result(result) -> None:
    from kit.verdicts import VERDICT_FILE, VerdictReport

    print(
        f"\nstages run: {', '.join(result.ran) or 'none'}; "
        f"up to date: {', '.join(result.skipped) or 'none'}"
    )
    print(f"notebooks: {result.run_dir / 'notebooks'}")
    if (result.run_dir / VERDICT_FILE).exists() and result.memo.exists():
        report = VerdictReport.load(result.run_dir)
        _print_budget_banner(report)
        for d in report.decisions:
            print(f"  {d.candidate}: {d.decision.upper()} ({d.reason})")
        print(f"memo: {result.memo}")


def _print_budget_banner(report, *, file=None) -> None:
    """The memo's budget banner on the terminal: the budget changed after freezing."""
    if report.budget.changed:
        print(f"BUDGET CHANGED AFTER FREEZING: {report.budget.message}", file=file)
        if report.budget.diff:
            print(report.budget.diff.rstrip(), file=file)


def _cmd_monitor(args: argparse.Namespace) -> int:
    import json

    from kit.routing.monitor import monitor_log

    checks = monitor_log(args.run, log=args.log, candidate=args.candidate)
    if args.json:
        print(json.dumps(json.loads(checks.to_json(orient="records")), indent=2))
    else:
        for r in checks.itertuples():
            state = "DRIFT" if r.drifted else "ok"
            print(
                f"{r.check:>17}: {state:5} reference {r.reference:.4g}, observed "
                f"{r.observed:.4g} ({r.note})"
            )
    drifted = bool(checks["drifted"].any())
    print(f"monitor: {'drift' if drifted else 'no drift'} -> exit {int(drifted)}")
    return int(drifted)


def _cmd_gate(args: argparse.Namespace) -> int:
    import json

    from kit.pipeline import unfinished_reason
    from kit.verdicts import GATE_EXIT_CODES, VerdictReport

    run = Path(args.run)
    if not run.is_dir():
        raise CompkitError(f"run folder {run} does not exist")
    problem = unfinished_reason(run)
    if problem is not None:
        raise CompkitError(f"{run} is unfinished: {problem}")
    report = VerdictReport.load(run)
    decision = report.decision(args.candidate)
    verdicts = report.verdicts_frame()
    if args.candidate is not None:
        verdicts = verdicts[verdicts["candidate"] == args.candidate]
    if args.json:
        _print_budget_banner(report, file=sys.stderr)
        print(json.dumps(json.loads(verdicts.to_json(orient="records")), indent=2))
        return GATE_EXIT_CODES[decision]
    _print_budget_banner(report)
    for d in report.decisions:
        if args.candidate is None or d.candidate == args.candidate:
            print(f"{d.candidate}: {d.decision} ({d.reason})")
            if d.decision == "accepted with routing rule":
                print(
                    f"  deploy as {d.routed_system}: {d.routing_rule} (fallback rate "
                    f"{(d.fallback_rate or 0) * 100:.1f}%, saves {(d.cost_saving or 0) * 100:.1f}%"
                    f" of the large-only cost; {d.routing_selection})"
                )
    scope = f"candidate {args.candidate!r}" if args.candidate else "all candidates"
    print(f"gate ({scope}): {decision} -> exit {GATE_EXIT_CODES[decision]}")
    return GATE_EXIT_CODES[decision]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compkit",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    from kit import __version__

    parser.add_argument("--version", action="version", version=f"compkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a study and its eval set; print a summary")
    p.add_argument("study", help="study YAML")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "new", help="write a new study (study.yaml, prompt.jinja, budget.yaml) and validate it"
    )
    p.add_argument("name", help="study name; the folder it goes to unless --dir")
    p.add_argument("--eval-set", required=True, metavar="FILE", help="eval set (JSONL, CSV, ...)")
    p.add_argument(
        "--baseline",
        required=True,
        metavar="MODEL",
        help="builtin:<name>, an HF folder, a .gguf file, a predictions .jsonl, or a served name",
    )
    p.add_argument("--runtime", help="default: from MODEL (.gguf llamacpp, .jsonl predictions)")
    p.add_argument("--dir", help="folder to write (default ./NAME); existing files are refused")
    p.add_argument("--task", help="task of eval rows without a 'task' column")
    p.set_defaults(func=_cmd_new)

    p = sub.add_parser("freeze", help="stage 1: run the baseline and freeze it in a run folder")
    p.add_argument("study", help="study YAML")
    p.add_argument("--out", required=True, help="run folder to create, e.g. runs/my-study")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_freeze)

    p = sub.add_parser("check", help="re-hash a frozen run's inputs; exit 1 when any changed")
    p.add_argument("run", help="run folder")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "candidates", help="stage 2: run the study's candidates on the frozen inputs"
    )
    p.add_argument("study", nargs="?", help="study YAML (optional: the run folder knows its study)")
    p.add_argument(
        "--out", dest="run", required=True, help="the frozen run folder, e.g. runs/my-study"
    )
    p.add_argument(
        "--only", action="append", metavar="NAME", help="run only this candidate (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="discard and rerun finished candidates")
    p.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=None,
        metavar="ADDRESS",
        help="shard each candidate over Ray actors (one model replica each): join the cluster "
        "at ADDRESS ('auto', HOST:PORT, ray://HOST:10001), else the study's execution.address, "
        "else start a local Ray (needs compkit[ray])",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="model replicas on Ray (default: the study's execution.workers, 2)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_candidates)

    p = sub.add_parser(
        "run", help="run every stage notebook with papermill (resumes finished stages)"
    )
    p.add_argument("study", help="study YAML")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/my-study")
    p.add_argument(
        "--stage",
        action="append",
        metavar="NAME",
        help="run only this stage, always (repeatable): freeze, candidates, drilldown, "
        "calibration, robustness, serving, routing, memo",
    )
    p.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help="show the notebook kernels' log lines")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "serve-bench",
        help="stage 5 alone: deploy, load and measure the study's served models",
    )
    p.add_argument("study", help="study YAML (models with a serving: block are measured)")
    p.add_argument("--out", required=True, help="the frozen run folder, e.g. runs/my-study")
    p.add_argument(
        "--model", action="append", metavar="NAME", help="measure only this model (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="measure again though results are stored")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_serve_bench)

    p = sub.add_parser(
        "gate",
        help="CI gate on a judged run: exit 0 accepted, 1 rejected, 3 inconclusive, "
        "4 accepted with routing rule",
    )
    p.add_argument("run", help="run folder with verdict.json")
    p.add_argument(
        "--candidate",
        metavar="NAME",
        help="gate this candidate only (default: pass only if every candidate is accepted)",
    )
    p.add_argument("--json", action="store_true", help="print the verdict rows as JSON")
    p.set_defaults(func=_cmd_gate)

    p = sub.add_parser(
        "monitor",
        help="the routing rule against a later request log: fallback rate, rule agreement, "
        "confidence shift, labelled accuracy; exit 1 on drift",
    )
    p.add_argument("run", help="run folder where stage 6 (routing) ran")
    p.add_argument("--log", required=True, help="request log (JSONL) of the deployed router")
    p.add_argument("--candidate", metavar="NAME", help="routed candidate (default: the first)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_cmd_monitor)

    p = sub.add_parser(
        "demo", help="run the whole pipeline on the built-in demo study; print the memo path"
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the notebook kernels' log lines")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CompkitError as exc:
        print(f"compkit {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            f"compkit {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
