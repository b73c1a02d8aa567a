"""W&B as a new user meets it: WANDB_MODE=disabled|offline|online with every shipped config,
``wandb login`` found the way wandb finds it, no network failing fast, and no temporary
folders left behind by a killed run."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from regfit.cli import main
from regfit.lightning_cli import RegfitSaveConfig
from regfit.wandb_setup import wandb_credentials_found
from tests.reliability.harness import (
    CONFIGS,
    L2_CONFIG,
    QUIET,
    assert_one_paragraph,
    env_for_subprocess,
    free_port,
    regfit_command,
    spawn,
)

KEY = "k" * 40


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    """No real credentials, settings or network; a fresh wandb setup per test (it reads the
    environment once per process)."""
    import wandb

    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(RegfitSaveConfig, "offline_notice_shown", False)
    monkeypatch.chdir(tmp_path)
    wandb.teardown()
    yield
    wandb.teardown()


def fit_args(config: Path | str, mnist_dir: Path, save_dir: Path) -> list[str]:
    """The config as shipped (its WandbLogger kept), a few batches, logs under save_dir."""
    args = ["fit", "--config", str(config), f"--data.data_dir={mnist_dir}", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_checkpointing=false",
            *QUIET]
    if "WandbLogger" in Path(config).read_text():
        args.append(f"--trainer.logger.init_args.save_dir={save_dir}")
    else:
        args.append(f"--trainer.default_root_dir={save_dir}")
    return args


@pytest.mark.parametrize("mode", ["disabled", "offline"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_runs_with_wandb_disabled_or_offline(config, mode, mnist_dir, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("WANDB_MODE", mode)
    save_dir = tmp_path / "logs"
    assert main(fit_args(config, mnist_dir, save_dir)) == 0, capsys.readouterr().err
    runs = list((save_dir / "wandb").glob("*run-*"))
    if "WandbLogger" not in config.read_text():
        return
    if mode == "disabled":
        assert not runs  # nothing written for W&B
    else:
        (run,) = runs
        assert (run / "files" / "regfit-config.yaml").is_file()


def test_test_and_sweep_run_with_wandb_disabled(mnist_dir, tmp_path, monkeypatch, capsys):
    """`regfit test` and `regfit sweep` with the shipped W&B logger (both stopped at start with
    "No such file …/files/regfit-config.yaml")."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    save_dir = tmp_path / "logs"
    assert main(["test", "--config", L2_CONFIG, f"--data.data_dir={mnist_dir}", "--trainer.limit_test_batches=1",
                 f"--trainer.logger.init_args.save_dir={save_dir}", *QUIET]) == 0, capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text("method: grid\nmetric: {name: val/acc, goal: maximize}\n"
                    "parameters: {regularization.strength: {values: [1.0e-4]}}\n"
                    f"command: ['${{env}}', regfit, fit, --config, {L2_CONFIG}, '${{args}}']\n")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--", f"--data.data_dir={mnist_dir}",
                 "--model.init_args.widths=[32]", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                 "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={save_dir}", *QUIET]) == 0
    assert "COMPLETE" in (tmp_path / "out" / "trials.csv").read_text()
    assert not (save_dir / "wandb").exists() or not list((save_dir / "wandb").glob("*run-*"))


def test_no_credentials_and_no_mode_logs_offline_and_says_why(mnist_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="regfit"):
        assert main(fit_args(L2_CONFIG, mnist_dir, tmp_path / "logs")) == 0
    assert "W&B is offline (no API key found)" in caplog.text and "wandb sync" in caplog.text


def test_online_without_credentials_stops_at_once_with_the_fix(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    start = time.monotonic()
    assert main(fit_args(L2_CONFIG, mnist_dir, tmp_path / "logs")) == 2
    assert_one_paragraph(capsys.readouterr().err, "WANDB_MODE=online", "wandb login", "WANDB_MODE=offline")
    assert time.monotonic() - start < 30


def test_an_unknown_mode_is_named(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offlline")
    assert main(fit_args(L2_CONFIG, mnist_dir, tmp_path / "logs")) == 2
    assert_one_paragraph(capsys.readouterr().err, "WANDB_MODE='offlline'", "online, offline or disabled")


def silent_server() -> tuple[str, socket.socket]:
    """A server that accepts connections and never answers (a black-holed network path)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return f"http://127.0.0.1:{server.getsockname()[1]}", server


def test_a_key_without_network_falls_back_to_offline_within_seconds(mnist_dir, tmp_path, monkeypatch, caplog):
    import regfit.wandb_setup

    url, server = silent_server()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setattr(regfit.wandb_setup, "PROBE_TIMEOUT_S", 2.0)
    start = time.monotonic()
    try:
        with caplog.at_level("WARNING", logger="regfit"):
            assert main(fit_args(L2_CONFIG, mnist_dir, tmp_path / "logs")) == 0
    finally:
        server.close()
    assert time.monotonic() - start < 60  # wandb alone waited 90 s for the server, then raised
    assert f"the W&B server {url} did not answer within 2 s" in caplog.text and "wandb sync" in caplog.text
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))


def test_online_with_a_key_and_no_server_stops_within_seconds(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: refused
    start = time.monotonic()
    assert main(fit_args(L2_CONFIG, mnist_dir, tmp_path / "logs")) == 2
    assert_one_paragraph(capsys.readouterr().err, "did not answer", "WANDB_MODE=offline")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "logs" / "wandb").exists() or not list((tmp_path / "logs" / "wandb").iterdir())


class _Answering(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_reachable_server_with_a_key_stays_online(monkeypatch):
    """configure_wandb leaves WANDB_MODE alone when the key is there and the server answers."""
    from regfit.wandb_setup import configure_wandb

    server = http.server.HTTPServer(("127.0.0.1", 0), _Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"WANDB_API_KEY": KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_port}"}
        assert configure_wandb(env, probe=True) is False and "WANDB_MODE" not in env
    finally:
        server.shutdown()


def test_the_entry_wandb_login_writes_is_found(tmp_path):
    """``wandb login`` stores the key under wandb's own default host (api.forge.coreweave.com in
    wandb 0.31, api.wandb.ai before): regfit asks wandb, so either is found."""
    from wandb.sdk.lib import urls, wbauth

    wbauth.write_netrc_auth(host=urls.DEFAULT_BASE_URL if hasattr(urls, "DEFAULT_BASE_URL") else "https://api.wandb.ai",
                            api_key=KEY)
    assert (tmp_path / "netrc").read_text().count(KEY) == 1
    assert wandb_credentials_found()


def test_a_settings_file_base_url_is_followed(tmp_path, monkeypatch):
    """`wandb login --host URL` writes base_url to wandb's settings file and the key under that host."""
    from wandb.sdk.lib import wbauth

    host = "https://wandb.example.com"
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text(f"[default]\nbase_url = {host}\n")
    assert not wandb_credentials_found()
    wbauth.write_netrc_auth(host=host, api_key=KEY)
    assert wandb_credentials_found()


def test_a_killed_run_leaves_no_wandb_folders_in_the_temp_folder(mnist_dir, tmp_path):
    """wandb makes two temporary folders when it is imported and removes them only at a clean
    exit (were left by every killed run); after kill -9 the next regfit command removes them."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = env_for_subprocess(TMPDIR=str(temp), WANDB_MODE="offline", NETRC=str(tmp_path / "netrc"))
    proc = spawn(regfit_command(*fit_args(L2_CONFIG, mnist_dir, tmp_path / "logs"), "--trainer.limit_train_batches=400"),
                 tmp_path / "fit.txt", cwd=tmp_path, env=env)
    deadline = time.monotonic() + 180
    while len([p for p in temp.rglob("*") if "wandb" in p.name]) < 2 and proc.poll() is None:  # wandb imported
        assert time.monotonic() < deadline, (tmp_path / "fit.txt").read_text()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert [p for p in temp.rglob("*") if "wandb" in p.name]  # what kill -9 leaves
    subprocess.run(regfit_command("--help"), env=env, cwd=tmp_path, capture_output=True, timeout=120, check=False)
    assert not [p for p in temp.rglob("*") if "wandb" in p.name], list(temp.rglob("*"))
