"""What every ``spinctl`` command shares: the cluster connection (kubeconfig, context, namespace, like
kubectl), the output option, and the translation of every failure into one clear line and exit code 1.

Commands stack the options defined here; nothing else in the CLI loads a kubeconfig or catches exceptions.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

F = TypeVar("F", bound=Callable[..., Any])
OUTPUTS = ("table", "json", "yaml")


@dataclass
class Session:
    """A lazily opened connection to the cluster named by --kubeconfig / --context / --namespace."""

    kubeconfig: str | None
    context: str | None
    namespace_flag: str | None

    def _config_file(self) -> str | None:
        if self.kubeconfig:
            return self.kubeconfig
        for path in (os.environ.get("KUBECONFIG") or "").split(os.pathsep):
            if path and Path(path).expanduser().is_file():
                return path
        default = Path("~/.kube/config").expanduser()
        return str(default) if default.is_file() else None

    @functools.cached_property
    def api(self) -> client.ApiClient:
        path = self._config_file()
        if path is not None:
            return config.new_client_from_config(config_file=path, context=self.context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            return client.ApiClient()
        raise click.ClickException("no cluster configured: pass --kubeconfig or set KUBECONFIG")

    @functools.cached_property
    def namespace(self) -> str:
        """--namespace, else the kubeconfig context's namespace, else ``default`` (as kubectl does)."""
        if self.namespace_flag:
            return self.namespace_flag
        path = self._config_file()
        if path is not None:
            contexts, active = config.list_kube_config_contexts(config_file=path)
            chosen = next((c for c in contexts if c["name"] == self.context), active) if self.context else active
            ns = ((chosen or {}).get("context") or {}).get("namespace")
            if ns:
                return str(ns)
        return "default"

    @property
    def objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def secret(self, name: str) -> dict[str, str]:
        """A Secret's data in this namespace, decoded; ApiException (404, 403...) as the server answered."""
        found = self.core.read_namespaced_secret(name, self.namespace)
        return {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}


def cluster_options(f: F) -> F:
    """--kubeconfig, --context and -n/--namespace; the command receives ``session: Session``."""

    @click.option("--kubeconfig", envvar="KUBECONFIG", metavar="PATH",
                  help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster)")
    @click.option("--context", metavar="NAME", help="kubeconfig context (default: the current one)")
    @click.option("-n", "--namespace", metavar="NS", help="namespace (default: the context's, else default)")
    @functools.wraps(f)
    def wrapper(*args: Any, kubeconfig: str | None, context: str | None, namespace: str | None,
                **kwargs: Any) -> Any:
        if kubeconfig and os.pathsep in kubeconfig:  # $KUBECONFIG may list several files
            kubeconfig = next((p for p in kubeconfig.split(os.pathsep) if Path(p).is_file()), None)
        if kubeconfig and not Path(kubeconfig).expanduser().is_file():
            raise click.ClickException(f"kubeconfig {kubeconfig} does not exist")
        return f(*args, session=Session(kubeconfig, context, namespace), **kwargs)

    return wrapper  # type: ignore[return-value]


def _output(f: F, choices: tuple[str, ...]) -> F:
    return click.option("-o", "--output", "fmt", type=click.Choice(choices), default="table", show_default=True,
                        help="output format")(f)


def output_option(f: F) -> F:
    """-o/--output table|json|yaml; the command receives ``fmt``."""
    return _output(f, OUTPUTS)


def list_output_option(f: F) -> F:
    """-o/--output table|wide|json|yaml|name, as ``kubectl get`` takes; the command receives ``fmt``."""
    return _output(f, ("table", "wide", "json", "yaml", "name"))


def api_error(e: ApiException) -> str:
    """One line from an API error: the server's own message, with a hint where it helps."""
    try:
        body = json.loads(e.body or "{}")
    except ValueError:
        body = {}
    message = str(body.get("message") or e.reason or f"HTTP {e.status}").replace("\n", " ")
    if e.status == 404 and not (body.get("details") or {}).get("name"):
        return "the SpinRun API is not installed in this cluster (helm install spin charts/spin)"
    if e.status == 401:
        return f"not authorized by the cluster: {message} (are the kubeconfig's credentials still valid?)"
    return message


class Group(click.Group):
    """Turns every failure into one line on stderr and exit code 1 (``--debug`` shows the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # `spinctl logs NAME | head`: click leaves quietly when the reader has gone
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(describe(e)) from None


def describe(e: Exception) -> str:
    """The one line a user sees for an exception that escaped a command."""
    import urllib3

    if isinstance(e, ApiException):
        return api_error(e)
    if isinstance(e, urllib3.exceptions.MaxRetryError):
        return f"cannot reach the cluster at {e.pool.scheme}://{e.pool.host}:{e.pool.port} ({_reason(e.reason)})"
    if isinstance(e, ConfigException):
        return f"bad kubeconfig: {e}"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _reason(reason: Exception | None) -> str:
    text = str(reason or "no answer")
    for known in ("Connection refused", "timed out", "Name or service not known", "certificate verify failed"):
        if known in text:
            return known.lower()
    return text.rsplit(": ", maxsplit=1)[-1][:120]
