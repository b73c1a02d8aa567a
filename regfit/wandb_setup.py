"""W&B without prompts or stalls: decide, before any run starts, how W&B logs.

``regfit`` never lets wandb ask for a login or wait minutes for a server in the middle of a
command. Before the loggers are built, :func:`configure_wandb` settles ``WANDB_MODE``:

=============  ==============  ================  ==========================================
WANDB_MODE     credentials     server answers    regfit
=============  ==============  ================  ==========================================
disabled       any             —                 W&B off (the logger's calls do nothing)
offline        any             —                 offline runs under the logger's save_dir
unset          none            —                 offline, said once with how to upload
unset          found           no (in seconds)   offline, said once with why
unset/online   found           yes               online
online         none            —                 stop: exit 2, one paragraph
online         found           no (in seconds)   stop: exit 2, one paragraph
=============  ==============  ================  ==========================================

Credentials are looked up the way wandb itself looks them up (:func:`wandb_credentials_found`
asks wandb's settings and netrc reader, so ``wandb login`` for any server counts), never by
parsing netrc hosts here. wandb creates two temporary folders when it is imported and
removes them only at a clean exit; :func:`import_wandb` puts them in a folder of this
process that the next regfit command removes if this one was killed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from regfit.errors import RunError, UsageError

__all__ = [
    "PROBE_TIMEOUT_S",
    "configure_wandb",
    "import_wandb",
    "offline_reason",
    "remove_stale_wandb_temp",
    "wandb_base_url",
    "wandb_credentials_found",
    "wandb_server_unreachable",
]

#: Seconds regfit waits for the W&B server to answer before it logs offline (or stops).
PROBE_TIMEOUT_S = 5.0
_MODES = ("online", "offline", "disabled", "dryrun", "run")
_TEMP_PREFIX = "regfit-wandb-"
_offline_reason = ""


def offline_reason() -> str:
    """Why W&B logs offline in this process (for the notice shown once), or ``""``."""
    return _offline_reason or ("WANDB_MODE=offline" if os.environ.get("WANDB_MODE") in ("offline", "dryrun") else "")


@contextlib.contextmanager
def _as_environ(env: MutableMapping[str, str]) -> Iterator[None]:
    """Show wandb (which reads ``os.environ``) the W&B variables of ``env`` for a block."""
    if env is os.environ:
        yield
        return
    keys = {k for k in [*os.environ, *env] if k.startswith("WANDB_") or k == "NETRC"}
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in keys:
            if k in env:
                os.environ[k] = env[k]
            else:
                os.environ.pop(k, None)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wandb_settings():  # -> wandb.sdk.wandb_settings.Settings
    """wandb's settings as ``wandb.init`` would start from them: system settings files, then
    the environment."""
    from wandb.sdk.wandb_settings import Settings

    settings = Settings(silent=True)  # silent: no "Loading settings from …" line
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    settings.settings_system = str(Path(config_dir or "~/.config/wandb").expanduser() / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings


def wandb_base_url(environ: MutableMapping[str, str] | None = None) -> str:
    """The W&B server wandb would talk to (``WANDB_BASE_URL``, ``wandb login --host``, or its default)."""
    env = os.environ if environ is None else environ
    with _as_environ(env):
        import_wandb()
        try:
            return str(_wandb_settings().base_url)
        except Exception:  # noqa: BLE001 - an invalid URL: wandb reports it itself when it starts
            return env.get("WANDB_BASE_URL", "")


def wandb_credentials_found(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether wandb would find credentials without prompting: ``WANDB_API_KEY``, an identity
    token file, an ``api_key`` setting, or the netrc entry ``wandb login`` wrote for the server
    (asked from wandb, which knows under which host it stores it)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    with _as_environ(env):
        import_wandb()
        try:
            from wandb.sdk.lib import wbauth

            settings = _wandb_settings()
            if settings.api_key:
                return True
            return wbauth.read_netrc_auth(host=settings.base_url) is not None
        except ImportError:
            return False
        except Exception:  # noqa: BLE001 - a malformed key or URL: found, and wandb will say what is wrong
            return True


def wandb_server_unreachable(url: str, timeout: float | None = None) -> str:
    """``""`` if the server at ``url`` answers HTTP within ``timeout`` seconds (any status),
    else why it did not. Proxies are taken from the environment, as wandb takes them."""
    if not url:
        return ""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/healthz"), timeout=timeout):
            return ""
    except urllib.error.HTTPError:
        return ""  # it answered
    except urllib.error.URLError as exc:
        reason = exc.reason
        return f"{getattr(reason, 'strerror', None) or reason}"
    except (OSError, ValueError) as exc:  # a timeout, a reset connection, a malformed URL
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def configure_wandb(environ: MutableMapping[str, str] | None = None, probe: bool = False,
                    timeout: float | None = None) -> bool:
    """Settle ``WANDB_MODE`` before a run starts (see the table above).

    Args:
        environ: the environment to read and update (default ``os.environ``).
        probe: also check, within ``timeout`` seconds, that the W&B server answers when the
            run would be online (the ``regfit`` commands do; a bare check of credentials
            does not).

    Returns:
        Whether offline mode was switched on here.

    Raises:
        UsageError: ``WANDB_MODE`` is not a W&B mode.
        RunError: ``WANDB_MODE=online`` without credentials, or with a server that does not answer.
    """
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode and mode not in _MODES:
        raise UsageError(f"WANDB_MODE={env['WANDB_MODE']!r} is not a W&B mode: use online, offline or disabled.")
    if mode in ("offline", "dryrun", "disabled"):
        return False
    if not wandb_credentials_found(env):
        if mode:
            raise RunError(
                f"WANDB_MODE={mode} but no W&B credentials were found: run `wandb login` (or set WANDB_API_KEY), or "
                "log without an account: WANDB_MODE=offline (upload later with `wandb sync`) or WANDB_MODE=disabled."
            )
        return _go_offline(env, "no API key found")
    if probe:
        timeout = PROBE_TIMEOUT_S if timeout is None else timeout
        url = wandb_base_url(env)
        why = wandb_server_unreachable(url, timeout)
        if why:
            if mode:
                raise RunError(
                    f"WANDB_MODE={mode} but the W&B server {url} did not answer within {timeout:g} s ({why}). Check "
                    "the network (and HTTPS_PROXY), or log offline with WANDB_MODE=offline and upload later with "
                    "`wandb sync`."
                )
            return _go_offline(env, f"the W&B server {url} did not answer within {timeout:g} s: {why}")
    return False


def _go_offline(env: MutableMapping[str, str], reason: str) -> bool:
    global _offline_reason
    env["WANDB_MODE"] = "offline"
    # wandb's own banners would repeat what regfit's one line says, in five lines.
    env.setdefault("WANDB_SILENT", "true")
    if env is os.environ:
        _offline_reason = reason
    return True


# ------------------------------------------------------------------ wandb's temporary folders


def import_wandb() -> None:
    """Import wandb with the temporary folders it makes at import time (``…wandb-media``,
    ``…wandb-artifacts``) inside ``TMP/regfit-wandb-<pid>``: removed when this process exits,
    and by the next regfit command if this one is killed. Other temporary files are untouched."""
    if "wandb" in sys.modules:
        return
    root = Path(tempfile.gettempdir())
    remove_stale_wandb_temp(root)
    mine = root / f"{_TEMP_PREFIX}{os.getpid()}"
    try:
        mine.mkdir(exist_ok=True)
    except OSError:
        mine = None  # an unwritable temp folder: let wandb fail or cope as it would
    saved = tempfile.tempdir
    if mine is not None:
        atexit.register(shutil.rmtree, mine, True)
        tempfile.tempdir = str(mine)
    try:
        # wandb.sdk.artifacts.artifact holds a class-level TemporaryDirectory, _private MEDIA_TMP.
        for module in ("wandb", "wandb.sdk.artifacts.artifact", "wandb.sdk.data_types._private"):
            importlib.import_module(module)
    except ImportError:
        pass
    finally:
        tempfile.tempdir = saved


def remove_stale_wandb_temp(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the ``regfit-wandb-<pid>`` folders of processes that no longer run (killed
    regfit commands); returns the folders removed."""
    root = Path(tempfile.gettempdir() if root is None else root)
    removed = []
    for folder in root.glob(f"{_TEMP_PREFIX}*"):
        pid = folder.name[len(_TEMP_PREFIX):]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if folder.stat().st_uid == os.getuid():
                shutil.rmtree(folder)
                removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
