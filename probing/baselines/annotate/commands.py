"""`probing annotate serve | score | export`: the typer sub-app `probing.cli.app` adds. The options of `serve`
are derived from the declarations of `StudyDesign`, `DataOptions` and `ServerSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from probing.baselines.annotate.study import StudyDesign
from probing.core.errors import ProbingError
from probing.core.settings import cli_parameters, command, from_cli, setting
from probing.data.types import DataOptions

annotate_app = typer.Typer(
    help="The human baseline: an annotation page for a binary task, its scores (accuracy, Fleiss' kappa) and "
    "its answers.",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class ServerSettings:
    """Where the page is served and where answers go (not part of the study's identity)."""

    db: Path = setting(help="The study's SQLite file: created, or resumed when it holds the same study.")
    host: str = setting("127.0.0.1", help="Address to listen on (any other than loopback: give --token).")
    port: int = setting(7860, help="Port to listen on.", low=1)
    token: str | None = setting(None, help="A secret every request must carry (the page: ?token=...).")

    def check(self) -> ServerSettings:
        if self.port > 65535:
            raise ProbingError(f"--port: must be <= 65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ProbingError("--token: empty")
        from probing.baselines.annotate.server import check_reachable

        check_reachable(self.host, self.token)
        return self


def _serve(**values: Any) -> None:
    from probing.baselines.annotate.server import serve
    from probing.baselines.annotate.store import AnnotationStore
    from probing.baselines.annotate.study import prepare_study
    from probing.core.artifacts import check_output

    server = from_cli(ServerSettings, values).check()
    check_output(server.db, option="--db", file=True)
    study = prepare_study(from_cli(StudyDesign, values))
    resumed = server.db.exists()
    store = AnnotationStore.create_or_resume(server.db, study)
    scored = sum(item.role != "intro" for item in study.items)
    typer.echo(
        f"study {'resumed' if resumed else 'created'}: {server.db} ({study.spec.name} {study.design.split}, "
        f"{study.design.n} items per annotator, {study.design.intro} practice; {scored} scored items drawn)"
    )
    serve(store, server.host, server.port, server.token, say=typer.echo)


command(
    annotate_app,
    "serve",
    [*cli_parameters(StudyDesign), *cli_parameters(DataOptions), *cli_parameters(ServerSettings)],
    _serve,
    "Serve the annotation page of a balanced, seeded sample of a binary task (Ctrl-C stops; answers are kept).",
)


@annotate_app.command("score")
def score_command(
    db: Annotated[Path, typer.Option("--db", help="The study's SQLite file.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write (read by probing analyze / report).")],
    label: Annotated[str, typer.Option(help="The run's label in reports (Table 1's row).")] = "Human",
) -> None:
    """Accuracy after the paper's exclusions (bootstrap CI), Fleiss' kappa, per category: a run folder."""
    from probing.baselines.annotate.scoring import percent, score
    from probing.core.artifacts import check_output

    check_output(out, ("human-run",), inputs=(db,))
    result = score(db, out, label=label)
    summary = result.value
    accuracy, excluded, agreement = summary["accuracy"], summary["excluded"], summary["fleiss_kappa"]
    typer.echo(f"human run {'already there' if result.reused else 'written'}: {out}")
    typer.echo(
        f"  {summary['split']} accuracy {percent(accuracy['mean'])}% [{percent(accuracy['ci_low'])}, "
        f"{percent(accuracy['ci_high'])}] over {summary['kept']} answers of {len(summary['annotators'])} "
        f"annotator(s)"
    )
    typer.echo(
        f"  excluded {excluded['total']} of {summary['answers']}: "
        + ", ".join(f"{rule.replace('_', ' ')} {count}" for rule, count in excluded.items() if rule != "total")
    )
    kappa = agreement["kappa"]
    typer.echo(
        f"  Fleiss' kappa {kappa:.4f} ({len(agreement['raters'])} annotators, {len(agreement['items'])} shared items)"
        if kappa is not None
        else f"  Fleiss' kappa undefined: {agreement['reason']}"
    )
    for category, estimate in summary["per_category"].items():
        typer.echo(
            f"  {category:22s} {percent(estimate['mean'])}% [{percent(estimate['ci_low'])}, "
            f"{percent(estimate['ci_high'])}] ({estimate['examples']} answers)"
        )


@annotate_app.command("export")
def export_command(
    db: Annotated[Path, typer.Option("--db", help="The study's SQLite file.")],
    out: Annotated[Path, typer.Option("--out", help="The jsonl file to write.")],
) -> None:
    """Every answer (practice ones too, by role) as one JSON object per line."""
    from probing.baselines.annotate.scoring import export

    count = export(db, out)
    typer.echo(f"{count} answers: {out}")
