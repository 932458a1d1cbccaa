"""What every ``slmops`` command shares: the one ``--nats`` option, the fleet-id check, and
the one runner that turns errors into exit codes.

Exit codes: 0 done (also after Ctrl-C/SIGTERM for commands that run until a signal);
1 a failure at run time (NATS unreachable, a refused bundle, a port in use...), printed as one
line ``Error: ...``; 2 a usage error (a bad flag, config value or file), printed by click.
Output into a pipe whose reader left (``| head``) ends the command quietly (click's exit 1 on EPIPE).
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import click

from slmops.shared.errors import BundleError, ConfigError, NatsUnavailable, PermissionDenied, SlmopsError
from slmops.shared.names import validate_id

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = [
    "arch_option",
    "call",
    "cloud_key_options",
    "config_options",
    "describe",
    "errors_to_exit_codes",
    "fleet_id",
    "jetstream",
    "key_file_option",
    "leaf_errors",
    "nats_option",
    "out_dir_option",
    "parameter_origins",
    "print_config",
    "profiles_dir_option",
    "run",
    "samples_option",
    "signing_key_option",
    "table_line",
    "trust_option",
]  # fmt: skip

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _nats_url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    # Imported here: shared.connect imports nats (and nats aiohttp); `--help` must not.
    from slmops.shared.connect import check_nats_url

    try:
        return check_nats_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


_url_option = click.option(
    "--nats",
    "nats_url",
    envvar="SLMOPS_NATS_URL",
    default="nats://127.0.0.1:4222",
    show_default=True,
    callback=_nats_url,
    help="NATS server URL (several, comma-separated, for a cluster). Env: SLMOPS_NATS_URL.",
)

#: click parameter name -> (flag, env var, help) of the TLS options every networked command has.
TLS_OPTIONS = {
    "tls_ca": ("--tls-ca", "SLMOPS_TLS_CA", "PEM file of the CA that signed the NATS server's certificate; "
               "with it (or --tls-cert) the connection must be TLS. Env: SLMOPS_TLS_CA."),
    "tls_cert": ("--tls-cert", "SLMOPS_TLS_CERT", "This client's certificate (PEM) for a server that "
                 "verifies clients (mutual TLS); needs --tls-key. Env: SLMOPS_TLS_CERT."),
    "tls_key": ("--tls-key", "SLMOPS_TLS_KEY", "Private key (PEM) of --tls-cert. Env: SLMOPS_TLS_KEY."),
    "nats_creds": ("--creds", "SLMOPS_NATS_CREDS", "NATS credentials file (user JWT + seed, from `slmops "
                   "fleet enroll`) for a server in operator mode. Env: SLMOPS_NATS_CREDS."),
}  # fmt: skip


def nats_option(f: F) -> F:
    """``--nats`` (to ``nats_url``) and ``--tls-ca/--tls-cert/--tls-key`` of every networked
    command. The TLS files become the command's default connect options
    (``shared.connopts.use_connect_options``), so every connection it makes uses them; a
    command whose function takes ``tls_ca``/``tls_cert``/``tls_key`` receives them too (the
    edge and cloud put them in their config). One of cert/key without the other, or a file
    that is not PEM, is a usage error."""
    import functools
    import inspect

    wanted = set(inspect.signature(f).parameters)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from slmops.shared.connopts import ConnectOptions, use_connect_options

        tls = {name: kwargs.pop(name) if name not in wanted else kwargs[name] for name in TLS_OPTIONS}
        try:
            options = ConnectOptions(**tls)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        with use_connect_options(options):
            return f(*args, **kwargs)

    for name, (flag, envvar, help_) in reversed(TLS_OPTIONS.items()):
        wrapper = click.option(
            flag, name, envvar=envvar, default=None, help=help_,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
        )(wrapper)  # fmt: skip
    return _url_option(wrapper)  # type: ignore[return-value]  # functools.wraps keeps F's signature


def out_dir_option(help: str, *, required: bool = True) -> Callable[[F], F]:
    """``--out DIR`` (to ``out_dir``): a directory a command creates."""
    return click.option(
        "--out", "out_dir", required=required, default=None, type=click.Path(file_okay=False, path_type=Path),
        help=help,
    )  # fmt: skip


#: ``--profiles DIR`` (to ``profiles_dir``) of the commands that read device profiles.
profiles_dir_option = click.option(
    "--profiles",
    "profiles_dir",
    default=None,
    envvar="SLMOPS_PROFILES",
    type=click.Path(file_okay=False, path_type=Path),
    callback=lambda _ctx, _param, value: value if value is not None else _shipped_profiles(),
    help="Directory of device profiles (*.toml). Default: the profiles shipped with slmops "
    "(till, tablet, gateway; deploy/profiles in the repository). Env: SLMOPS_PROFILES.",
)


def _shipped_profiles() -> Path:
    from slmops.shared.profiles import shipped_profiles_dir

    return shipped_profiles_dir()


def samples_option(default: int) -> Callable[[F], F]:
    """``--samples N`` of the device lab: batch-1 calls per bundle and profile (at least 20)."""
    return click.option(
        "--samples", default=default, show_default=True, type=click.IntRange(min=20),
        help="Batch-1 calls per bundle and profile (interleaved with the reference's).",
    )  # fmt: skip


def key_file_option(
    flag: str, dest: str, *, envvar: str, help: str, required: bool = False
) -> Callable[[F], F]:
    """An option naming an existing private key file (to ``dest``; ``Env: ENVVAR.`` added to
    ``help``)."""
    return click.option(
        flag, dest, required=required, default=None, envvar=envvar, help=f"{help} Env: {envvar}.",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
    )  # fmt: skip


#: ``--key`` of the commands that sign bundles or fleet configuration (to ``key_path``).
signing_key_option = key_file_option(
    "--key", "key_path", required=True, envvar="SLMOPS_SIGNING_KEY",
    help="Ed25519 private key (*.key from `slmops keys new`) that signs what the command publishes "
    "(a bundle, a fleet configuration); nodes must trust its key.",
)  # fmt: skip


def cloud_key_options(recalibrate_default: str | None) -> Callable[[F], F]:
    """``--key`` (the cloud's signing key, to ``key_path``) and ``--recalibrate`` of the
    commands that run the recalibration loop (``slmops cloud``, ``slmops rollout run``)."""
    key = key_file_option(
        "--key", "key_path", envvar="SLMOPS_CLOUD_KEY",
        help="The cloud's Ed25519 private key (mode 0600) that signs recalibrated versions; nodes "
        "trust its .pub with --trust; needed by --recalibrate suggest/auto.",
    )  # fmt: skip
    recalibrate = click.option(
        "--recalibrate",
        type=click.Choice(["off", "suggest", "auto"]),
        default=recalibrate_default,
        show_default="off",
        help="On a fleet-wide label shift: build, sign and push a recalibrated version, then roll it "
        "out (auto) or name it in a follow-up drift event (suggest), or do nothing (off). Needs --key.",
    )
    return lambda f: key(recalibrate(f))


def config_options(example: str, envvar: str) -> Callable[[F], F]:
    """``--config FILE`` (to ``config_file``, also from ``envvar``) and ``--print-config`` of
    ``slmops edge`` and ``slmops cloud``; ``example`` names keys for the help."""
    config = click.option(
        "--config",
        "config_file",
        envvar=envvar,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help=f"TOML/JSON file whose keys are these flags' names ({example}); flags given on the "
        "command line or in the environment win.",
    )
    show = click.option(
        "--print-config",
        is_flag=True,
        help="Print the effective settings, each with where it came from (default, file, env, flag), "
        "and exit.",
    )
    return lambda f: config(show(f))


def arch_option(help: str, choices: Sequence[str] = ("minilm", "ngram")) -> Callable[[F], F]:
    """``--arch minilm|ngram`` (default minilm; ``choices`` may add more): which model the
    factory builds."""
    return click.option(
        "--arch", type=click.Choice(list(choices)), default="minilm", show_default=True, help=help
    )


def _trust(_ctx: click.Context, _param: click.Parameter, value: tuple[Path, ...]) -> tuple[Path, ...]:
    """Each --trust file must be a PEM public key; a private key is named as the mistake."""
    from slmops.shared.bundle import load_public_key

    for path in value:
        try:
            load_public_key(path)
        except ValueError as exc:
            try:
                private = b"PRIVATE KEY" in path.read_bytes()[:200]
            except OSError:
                private = False
            hint = f"{path} is a private key: give its public half (the .pub file)" if private else str(exc)
            raise click.BadParameter(hint) from None
    return value


def trust_option(help: str, envvar: str | None, *, flag: str = "--trust") -> Callable[[F], F]:
    """``--trust KEY.pub`` (repeatable, to ``trust``): public keys whose signatures are
    accepted; a private key given there is a usage error saying so. ``flag="--trust-root"``
    makes the option of the key-list root keys (to ``trust_root``)."""
    return click.option(
        flag, flag.removeprefix("--").replace("-", "_"), multiple=True, envvar=envvar, callback=_trust,
        help=help, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )  # fmt: skip


def fleet_id(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    """click callback: ``value`` (or each of a tuple) as a valid fleet id, else a usage error."""
    try:
        if isinstance(value, tuple):
            return tuple(validate_id(v, "fleet") for v in value)
        return validate_id(value, "fleet") if value is not None else None
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc


@asynccontextmanager
async def jetstream(url: str, *, provision: bool = True) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on a fresh connection (failing fast with ``NatsUnavailable``), the
    slmops resources provisioned if missing unless ``provision`` is False (a read command
    creates nothing: its reads take a missing resource as empty); drained on exit."""
    from slmops.shared.connect import connect_once
    from slmops.shared.provision import ensure_resources

    nc = await connect_once(url, timeout=5.0, name="slmops-cli")
    try:
        js = nc.jetstream()
        if provision:
            await ensure_resources(js)
        yield js
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.drain()


def parameter_origins(ctx: click.Context, params: Mapping[str, str]) -> dict[str, str]:
    """Config field -> ``"flag"`` or ``"env <VAR>"`` for each click parameter (``params``:
    field -> parameter name) given on the command line or in the environment."""
    out = {}
    for field, param in params.items():
        source = ctx.get_parameter_source(param)
        if source == click.core.ParameterSource.COMMANDLINE:
            out[field] = "flag"
        elif source == click.core.ParameterSource.ENVIRONMENT:
            envvar = next((p.envvar for p in ctx.command.params if p.name == param), None)
            auto = f"{ctx.auto_envvar_prefix}_{param.upper()}" if ctx.auto_envvar_prefix else "?"
            out[field] = f"env {envvar if isinstance(envvar, str) else auto}"
    return out


def print_config(config: Any, origins: Mapping[str, str]) -> None:
    """The effective settings as a config file would write them (flag names as keys), each
    with where it came from: ``data = "./till-1"  # flag``."""
    import msgspec

    from slmops.shared.config import file_key

    plain = msgspec.to_builtins(config)
    tables = []
    for field in type(config).__struct_fields__:
        value, key, origin = plain[field], file_key(type(config), field), origins.get(field, "default")
        if field.endswith("token") and isinstance(value, str):
            value = "***"  # a secret: printed settings end up in tickets and logs
        if isinstance(value, dict):
            tables.append((key, value, origin))
        elif value is None:
            click.echo(f"# {key} = (unset)  # {origin}")
        else:
            click.echo(f"{key} = {json.dumps(_human(type(config), field, value))}  # {origin}")
    for key, table, origin in tables:
        click.echo(f"\n[{key}]  # {origin}")
        for k, v in table.items():
            click.echo(f"{k} = {json.dumps(v)}" if v is not None else f"# {k} = (unset)")


def _human(type_: Any, field: str, value: Any) -> Any:
    """Durations and sizes in the forms a config file takes: ``60.0`` -> ``"60s"``."""
    if field in getattr(type_, "DURATIONS", ()) and isinstance(value, int | float):
        for unit, n in (("h", 3600), ("m", 60)):
            if value >= n and value % n == 0:
                return f"{value / n:g}{unit}"
        return f"{value:g}s" if value >= 1 or value == 0 else f"{value * 1000:g}ms"
    if field in getattr(type_, "SIZES", ()) and isinstance(value, int):
        for unit, n in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value and value % n == 0:
                return f"{value // n}{unit}"
    return value


def table_line(cells: list[str], widths: list[int]) -> str:
    """One row of a plain-text table: each cell padded to its width (0: the last, unpadded)."""
    return "  ".join(c.ljust(w) if w else c for c, w in zip(cells, widths, strict=True)).rstrip()


class _Failed(click.ClickException):
    exit_code = 1


class _Failed2(_Failed):
    exit_code = 2


def _failed(exc: BaseException, exit_codes: Mapping[type[BaseException], int] | None) -> _Failed:
    code = next((c for t, c in (exit_codes or {}).items() if isinstance(exc, t)), 1)
    return (_Failed2 if code == 2 else _Failed)(_message(exc))


def _reported(exc: BaseException, denied: Sequence[str]) -> BaseException:
    """``exc``, or ``PermissionDenied`` (caused by it) when NATS failed after the server refused
    something: the refused request timed out, the refusal (seen only by the error callback) is
    the news."""
    if denied and isinstance(exc, NatsUnavailable):
        refused = PermissionDenied(list(denied))
        refused.__cause__ = exc
        return refused
    return exc


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The errors inside ``exc``: itself, or the leaves of a (nested) exception group, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_errors(sub)]
    return [exc]


def describe(exc: BaseException) -> str:
    """``Type: message`` of each error inside ``exc`` (``leaf_errors``), joined by ``"; "``: a
    task group's ``ExceptionGroup`` named by its causes instead of "unhandled errors"."""
    return "; ".join(f"{type(e).__name__}: {_message(e)}" for e in leaf_errors(exc))


def _message(exc: BaseException) -> str:
    if isinstance(exc, BundleError):
        return f"bundle refused [{exc.code}]: {exc.reason} ({exc.bundle})"
    return str(exc)


@overload
def run(
    main: Callable[[], Awaitable[T]],
    *,
    until_signal: Literal[False] = False,
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> T: ...
@overload
def run(
    main: Callable[[], Awaitable[T]],
    *,
    until_signal: Literal[True],
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> T | None: ...
def run(
    main: Callable[[], Awaitable[T]],
    *,
    until_signal: bool = False,
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> T | None:
    """Run ``main`` under anyio and map what it raises to an exit code: our errors,
    ``ValueError`` and ``OSError`` exit 1 with their one-line message (``exit_codes`` may give
    another code per type, e.g. ``{BundleError: 2}``); ``ConfigError`` is a usage error (2).
    Returns what ``main`` returned. With ``until_signal``, SIGINT or SIGTERM cancels ``main``
    and the command exits 0 (then None is returned); without it, Ctrl-C aborts the command
    (click's "Aborted!", exit 1). A bug still shows its traceback."""

    async def until_stopped() -> T | None:
        result: T | None = None
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def body() -> None:
                    nonlocal result
                    result = await main()
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
        return result

    with errors_to_exit_codes(exit_codes):
        try:
            return anyio.run(until_stopped) if until_signal else anyio.run(main)
        except KeyboardInterrupt:
            if until_signal:
                return None
            raise click.Abort from None
    raise AssertionError("unreachable")  # pragma: no cover  # errors_to_exit_codes re-raises


def call(fn: Callable[[], T], *, exit_codes: Mapping[type[BaseException], int] | None = None) -> T:
    """``fn()`` with its errors mapped to exit codes as ``run`` does (for sync work)."""
    with errors_to_exit_codes(exit_codes):
        return fn()
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def errors_to_exit_codes(exit_codes: Mapping[type[BaseException], int] | None = None) -> Iterator[None]:
    """The one mapping of errors to exit codes (module docstring); see ``run``. A NATS failure
    after the server refused a request for lack of permission (seen by ``connect_once``'s
    clients) is reported as ``permission denied: <what>``."""
    from slmops.shared.connopts import collect_permission_denials

    with collect_permission_denials() as denied:
        try:
            yield
        except BrokenPipeError:
            raise  # the reader left (`| head`): click's main exits quietly on EPIPE
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
        except (SlmopsError, ValueError, OSError) as exc:
            reported = _reported(exc, denied)
            raise _failed(reported, exit_codes) from reported
        except BaseExceptionGroup as group:
            # Task groups wrap our error: unwrap a lone one.
            found = leaf_errors(group)
            leaf = found[0] if len(found) == 1 else group
            if isinstance(leaf, BrokenPipeError):
                raise leaf from None
            if isinstance(leaf, ConfigError):
                raise click.UsageError(str(leaf)) from leaf
            if isinstance(leaf, SlmopsError | ValueError | OSError):
                reported = _reported(leaf, denied)
                raise _failed(reported, exit_codes) from reported
            raise
