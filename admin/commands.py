"""`fleetwise admin`: the admin API's commands, which `fleetwise/cli.py` mounts. Imports of
the service itself are lazy, so the command line starts fast."""

from pathlib import Path

import typer

admin_app = typer.Typer(help="The admin REST API: see the fleet, act on it, read the audit of every action.")


@admin_app.callback(invoke_without_command=True)
def admin(
    ctx: typer.Context,
    database: str = typer.Option("fleetwise-admin.db", "--database", envvar="FLEETWISE_ADMIN_DATABASE",
                                 help="A SQLite file, or a postgresql:// URL."),
    tokens: Path = typer.Option(None, "--tokens", envvar="FLEETWISE_ADMIN_TOKENS",
                                help="tokens.yaml (name, role, sha256 of each token), or the directory a Secret "
                                     "holding it is mounted as."),
    host: str = typer.Option("0.0.0.0", "--host"),
    port: int = typer.Option(8081, "--port"),
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="Default: in-cluster, else ~/.kube/config."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow browsers from this origin (repeatable)."),
    max_body_kib: int = typer.Option(64, "--max-body-kib", min=1, help="The largest request body; beyond it 413."),
    rate: float = typer.Option(20.0, "--rate", min=0.1, help="Requests per second per token; beyond it 429."),
    burst: int = typer.Option(40, "--burst", min=1, help="Requests at once per token."),
    prometheus_url: str = typer.Option(None, "--prometheus-url", envvar="FLEETWISE_PROMETHEUS_URL",
                                       help="Where the GPUs' power is read, for the power domains' headroom."),
    token_review: bool = typer.Option(False, "--token-review",
                                      help="Also take Kubernetes ServiceAccount tokens (a TokenReview), for the "
                                           "accounts the tokens file lists under serviceAccounts."),
):
    """Run the admin API against the cluster's worker pods and nodes."""
    if ctx.invoked_subcommand is not None:
        return
    if tokens is None:
        raise typer.BadParameter("the admin API needs its tokens: --tokens FILE (make one with "
                                 "`fleetwise admin token`)", param_hint="--tokens")
    from fleetwise.admin.app import Limits
    from fleetwise.admin.auth import TokenFile
    from fleetwise.admin.main import run
    try:
        book = TokenFile(tokens)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--tokens")
    run(database, book, host, port, kubeconfig, Limits(max_body_kib << 10, rate, burst, cors_origin), prometheus_url,
        token_review)


@admin_app.command("token")
def admin_token(
    name: str = typer.Option(..., "--name", help="Who holds it; the audit log names them by it."),
    role: str = typer.Option("viewer", "--role", help="viewer, operator or admin."),
):
    """Make a token: prints it once, and the tokens.yaml entry (its hash) to add."""
    from fleetwise.admin.auth import Role
    from fleetwise.admin.main import make_token
    if role.upper() not in Role.__members__:
        raise typer.BadParameter("must be viewer, operator or admin", param_hint="--role")
    token, entry = make_token(name, Role[role.upper()])
    typer.echo(f"token (shown once): {token}\nadd to tokens.yaml under `tokens:`\n{entry}", nl=False)
