"""W&B without prompts: decide, before any run starts, whether W&B logs online or offline.

``regfit`` never lets wandb ask for a login in the middle of a command: without
credentials (and with no ``WANDB_MODE`` chosen by the user) runs are logged offline, and
the CLI says once where they are and how to upload them.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["wandb_credentials_found", "configure_wandb"]


def wandb_credentials_found(environ: os._Environ | dict[str, str] | None = None) -> bool:
    """Whether W&B could log in without prompting: ``WANDB_API_KEY`` or a netrc entry.

    Checked without importing wandb (as ``wandb login`` stores it: the netrc entry for the
    host of ``WANDB_BASE_URL``, default ``api.wandb.ai``).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = env.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def configure_wandb(environ: os._Environ | dict[str, str] | None = None) -> bool:
    """Make W&B never prompt: without credentials (and no ``WANDB_MODE`` chosen), log offline.

    Returns whether offline mode was switched on here.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE") or wandb_credentials_found(env):
        return False
    env["WANDB_MODE"] = "offline"
    # wandb's own banners would repeat what the one line below says, in five lines.
    env.setdefault("WANDB_SILENT", "true")
    return True
