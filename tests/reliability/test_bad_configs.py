"""Bad configs and command lines, as a new user writes them: every one stops with exit 2 and one
paragraph naming the value (no traceback, nothing trained for most of them).

Each case runs in-process through ``regfit.cli.main`` on a tiny fit (two batches, no logger),
so the few mistakes that only show once training starts are covered too.
"""

from __future__ import annotations

import pytest

from regfit.cli import main
from tests.reliability.harness import L2_CONFIG, REPO, assert_one_paragraph, tiny_fit

CNN_CONFIG = str(REPO / "configs" / "mnist_cnn_grouplasso.yaml")


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)


# (overrides after `fit --config configs/mnist_l2.yaml <tiny fit>`, words the message must contain)
OVERRIDES: dict[str, tuple[list[str], list[str]]] = {
    # ---- model
    "model-unknown-class": (["--model.class_path=regfit.models.Transformer"], ["regfit.models.Transformer"]),
    "model-unknown-module": (["--model.class_path=nosuch.Net"], ["nosuch.Net"]),
    "model-not-a-regmodule": (["--model=torch.nn.Linear"], ["torch.nn.Linear is not a regfit.RegModule"]),
    "model-a-datamodule": (["--model.class_path=regfit.data.MNISTDataModule"], ["not a regfit.RegModule"]),
    "widths-zero": (["--model.init_args.widths=[0]"], ["widths=[0]"]),
    "widths-negative": (["--model.init_args.widths=[-8]"], ["widths"]),
    "widths-string": (["--model.init_args.widths=[abc]"], ["widths"]),
    "widths-float": (["--model.init_args.widths=[1.5]"], ["widths"]),
    "widths-empty": (["--model.init_args.widths=[]"], ["widths"]),
    "widths-no-brackets": (["--model.init_args.widths=512"], ["--model.init_args.widths=[512]"]),
    "activation-unknown": (["--model.init_args.activation=swishy"], ["swishy"]),
    "norm-unknown": (["--model.init_args.norm=group"], ["group"]),
    "dropout-above-one": (["--model.init_args.dropout=1.5"], ["dropout"]),
    "dropout-negative": (["--model.init_args.dropout=-0.1"], ["dropout"]),
    "in-features-zero": (["--model.init_args.in_features=0"], ["in_features"]),
    "in-features-mismatch": (["--model.init_args.in_features=100"], ["--model.init_args.in_features=784"]),
    "num-classes-one": (["--model.init_args.num_classes=1"], ["num_classes"]),
    "num-classes-mismatch": (["--model.init_args.num_classes=5"], ["num_classes"]),
    "model-unknown-argument": (["--model.init_args.depth=3"], ["depth"]),
    # ---- data
    "batch-size-zero": (["--data.init_args.batch_size=0"], ["batch_size"]),
    "batch-size-negative": (["--data.init_args.batch_size=-4"], ["batch_size"]),
    "batch-size-string": (["--data.init_args.batch_size=big"], ["batch_size"]),
    "val-fraction-above-one": (["--data.init_args.val_fraction=1.5"], ["val_fraction"]),
    "val-fraction-negative": (["--data.init_args.val_fraction=-0.2"], ["val_fraction"]),
    "data-seed-string": (["--data.init_args.seed=abc"], ["seed"]),
    "data-unknown-class": (["--data.class_path=regfit.data.CIFAR10DataModule"], ["CIFAR10DataModule"]),
    "data-unknown-argument": (["--data.init_args.shuffle_buffer=3"], ["shuffle_buffer"]),
    "data-dir-missing-offline": (["--data.init_args.data_dir=nowhere", "--data.init_args.download=false"],
                                 ["--data.data_dir"]),
    # ---- regularization
    "penalty-unknown": (["--regularization.penalty=l3"], ["'l3'"]),
    "penalty-bad-class": (["--regularization.penalty=torch.nn.Linear"], ["penalty"]),
    "penalty-missing-module": (["--regularization.penalty=nosuch.Penalty"], ["nosuch.Penalty"]),
    "mode-unknown": (["--regularization.mode=sideways"], ["sideways"]),
    "strength-negative": (["--regularization.strength=-1"], ["strength"]),
    "strength-nan": (["--regularization.strength=nan"], ["strength"]),
    "strength-inf": (["--regularization.strength=inf"], ["strength"]),
    "strength-string": (["--regularization.strength=lots"], ["strength"]),
    "exclude-unknown-keyword": (["--regularization.exclude=[biases]"], ["'biases'"]),
    "exclude-no-brackets": (["--regularization.exclude=bias"], ["--regularization.exclude=[bias]"]),
    "include-matches-nothing": (["--regularization.include=[body.9.*]"], ["'body.9.*'"]),
    "include-and-exclude-select-nothing": (["--regularization.include=[head.*]", "--regularization.exclude=[last_layer]"],
                                           ["select"]),
    "scale-unknown": (["--regularization.scale=mean"], ["mean"]),
    "scale-missing-callable": (["--regularization.scale=nosuch.scale_fn"], ["scale"]),
    "name-empty": (["--regularization.name="], ["name"]),
    "proximal-without-prox": (["--regularization.penalty=regfit.penalties.Orthogonal",
                               "--regularization.mode=proximal"], ["prox"]),
    "lp-p-too-large": (["--regularization.penalty=regfit.penalties.Lp", "--regularization.penalty.init_args.p=2"],
                       ["p"]),
    "lp-p-zero": (["--regularization.penalty=regfit.penalties.Lp", "--regularization.penalty.init_args.p=0"], ["p"]),
    "elasticnet-ratio-above-one": (["--regularization.penalty=regfit.penalties.ElasticNet",
                                    "--regularization.penalty.init_args.l1_ratio=2"], ["l1_ratio"]),
    "on-nonfinite-unknown": (["--regularization.on_nonfinite=ignore"], ["ignore"]),
    "duplicate-term-names": (
        ["--trainer.callbacks=[{class_path: regfit.Regularization, init_args: {penalty: l2}}]"], ["distinct `name`"]),
    "schedule-zero-steps": (["--regularization.schedule=regfit.schedules.Cosine",
                             "--regularization.schedule.init_args.total_steps=0"], ["total_steps"]),
    "schedule-unknown": (["--regularization.schedule=regfit.schedules.Exponential"], ["Exponential"]),
    "matrix-penalty-on-vectors": (["--regularization.penalty=regfit.penalties.Nuclear",
                                   "--regularization.exclude=[last_layer]"], ["ndim<2"]),
    # ---- optimizer and scheduler
    "optimizer-unknown": (["--optimizer=torch.optim.Adamm"], ["Adamm"]),
    "optimizer-not-an-optimizer": (["--optimizer=torch.nn.Linear"], ["torch.nn.Linear"]),
    "lr-negative": (["--optimizer.lr=-1"], ["-1"]),
    "lr-string": (["--optimizer.lr=fast"], ["lr"]),
    "lr-nan": (["--optimizer.lr=nan"], ["lr"]),
    "lr-inf": (["--optimizer.lr=inf"], ["lr"]),
    "lr-overflows-float32": (["--optimizer.lr=1e308"], ["lr", "1e+308"]),
    "betas-out-of-range": (["--optimizer.betas=[2.0, 0.9]"], ["beta"]),
    "weight-decay-negative": (["--optimizer.weight_decay=-0.1"], ["weight_decay"]),
    "eps-negative": (["--optimizer.eps=-1"], ["eps"]),
    "optimizer-unknown-argument": (["--optimizer.init_args.nesterov_mode=true"], ["nesterov_mode"]),
    "scheduler-unknown": (["--lr_scheduler=torch.optim.lr_scheduler.NoSuchLR"], ["NoSuchLR"]),
    "scheduler-step-size-zero": (["--lr_scheduler=torch.optim.lr_scheduler.StepLR",
                                  "--lr_scheduler.step_size=0"], ["step_size"]),
    "scheduler-missing-argument": (["--lr_scheduler=torch.optim.lr_scheduler.StepLR"], ["step_size"]),
    # ---- trainer
    "max-epochs-negative": (["--trainer.max_epochs=-5"], ["max_epochs"]),
    "max-epochs-string": (["--trainer.max_epochs=many"], ["max_epochs"]),
    "max-steps-negative": (["--trainer.max_steps=-3"], ["max_steps"]),
    "min-epochs-negative": (["--trainer.min_epochs=-2"], ["min_epochs"]),
    "check-val-every-zero": (["--trainer.check_val_every_n_epoch=0"], ["check_val_every_n_epoch=0"]),
    "check-val-every-negative": (["--trainer.check_val_every_n_epoch=-1"], ["check_val_every_n_epoch"]),
    "accumulate-zero": (["--trainer.accumulate_grad_batches=0"], ["accumulate_grad_batches=0"]),
    "accumulate-negative": (["--trainer.accumulate_grad_batches=-2"], ["accumulate_grad_batches"]),
    "log-every-zero": (["--trainer.log_every_n_steps=0"], ["log_every_n_steps"]),
    "limit-train-negative": (["--trainer.limit_train_batches=-1"], ["limit_train_batches"]),
    "limit-train-fraction-above-one": (["--trainer.limit_train_batches=1.5"], ["limit_train_batches"]),
    "limit-val-nan": (["--trainer.limit_val_batches=nan"], ["limit_val_batches"]),
    "val-check-interval-zero": (["--trainer.val_check_interval=0"], ["val_check_interval"]),
    "val-check-interval-negative": (["--trainer.val_check_interval=-0.5"], ["val_check_interval"]),
    "val-check-interval-beyond-epoch": (["--trainer.val_check_interval=500"], ["val_check_interval"]),
    "gradient-clip-negative": (["--trainer.gradient_clip_val=-1"], ["gradient_clip_val"]),
    "gradient-clip-algorithm-unknown": (["--trainer.gradient_clip_val=1", "--trainer.gradient_clip_algorithm=max"],
                                        ["gradient_clip_algorithm"]),
    "precision-unknown": (["--trainer.precision=13"], ["precision"]),
    "accelerator-unknown": (["--trainer.accelerator=quantum"], ["quantum"]),
    "accelerator-gpu-missing": (["--trainer.accelerator=gpu"], ["gpu"]),
    "devices-zero": (["--trainer.devices=0"], ["devices"]),
    "devices-string": (["--trainer.devices=many"], ["devices"]),
    "strategy-unknown": (["--trainer.strategy=fsdp9"], ["fsdp9"]),
    "num-nodes-zero": (["--trainer.num_nodes=0"], ["num_nodes"]),
    "num-sanity-negative": (["--trainer.num_sanity_val_steps=-3"], ["num_sanity_val_steps"]),
    "fast-dev-run-negative": (["--trainer.fast_dev_run=-1"], ["fast_dev_run"]),
    "callback-unknown": (["--trainer.callbacks=[{class_path: nosuch.Callback}]"], ["nosuch.Callback"]),
    "callback-not-a-callback": (["--trainer.callbacks=[{class_path: torch.nn.Linear}]"], ["torch.nn.Linear"]),
    "logger-unknown": (["--trainer.logger=lightning.pytorch.loggers.NoSuchLogger"], ["NoSuchLogger"]),
    "profiler-unknown": (["--trainer.profiler=fancy"], ["profiler", "'simple'"]),
    "deterministic-string": (["--trainer.deterministic=maybe"], ["deterministic"]),
    "unknown-trainer-option": (["--trainer.epochs=3"], ["--trainer.epochs=3"]),
    "default-root-dir-is-a-file": (["--trainer.default_root_dir=afile", "--trainer.enable_checkpointing=true"],
                                   ["afile"]),
    "seed-string": (["--seed_everything=abc"], ["seed_everything"]),
    # ---- the command line
    "unknown-top-level-option": (["--epochs=3"], ["--epochs=3"]),
    "unknown-section": (["--regularisation.strength=0.1"], ["regularisation"]),
    "ckpt-path-missing": (["--ckpt_path=no/such.ckpt"], ["no/such.ckpt"]),
    "ckpt-path-a-folder": (["--ckpt_path=."], ["folder"]),
}


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_a_bad_override_stops_with_one_paragraph(case, mnist_dir, tmp_path, capsys):
    overrides, needles = OVERRIDES[case]
    (tmp_path / "afile").write_text("not a folder\n")
    code = main(["fit", "--config", L2_CONFIG, *tiny_fit(mnist_dir), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_paragraph(err, *needles)


# (file contents, words the message must contain); the file is given as --config
FILES: dict[str, tuple[bytes, list[str]]] = {
    "empty": (b"", ["empty"]),
    "only-comments": (b"# nothing here yet\n", ["empty"]),
    "empty-mapping": (b"{}\n", ["empty"]),
    "a-list": (b"- model\n- data\n", ["not a mapping"]),
    "a-scalar": (b"mnist\n", ["not a mapping"]),
    "latin-1": ("model:\n  class_path: regfit.models.MLP  # größer\n".encode("latin-1"), ["not UTF-8", "line 2"]),
    "utf-16": ("model: {class_path: regfit.models.MLP}\n".encode("utf-16"), ["not UTF-8"]),
    "binary": (bytes(range(256)), ["not UTF-8"]),
    "unclosed-bracket": (b"model: [unclosed\n", ["not valid YAML"]),
    "tab-indent": (b"model:\n\tclass_path: regfit.models.MLP\n", ["not valid YAML"]),
    "duplicate-top-level-key": (b"model: {class_path: regfit.models.MLP}\nmodel: {class_path: regfit.models.CNN}\n",
                                ["'model' is given twice", "line 2"]),
    "duplicate-nested-key": (b"optimizer:\n  class_path: torch.optim.SGD\n  init_args:\n    lr: 0.1\n    lr: 0.01\n",
                             ["'lr' is given twice", "line 5", "first on line 4"]),
    "unknown-section": (b"modle:\n  class_path: regfit.models.MLP\n", ["modle"]),
    "section-is-a-list": (b"model: {class_path: regfit.models.MLP}\ntrainer: [max_epochs, 3]\n", ["trainer"]),
    "wrong-type-in-file": (b"trainer:\n  max_epochs: three\n", ["max_epochs"]),
    "strength-as-string": (b"regularization:\n  strength: lots\n", ["strength"]),
    "null-model": (b"model: null\n", ["model"]),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_a_bad_config_file_stops_with_one_paragraph(case, mnist_dir, tmp_path, capsys):
    content, needles = FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(content)
    code = main(["fit", "--config", str(path), "--trainer.logger=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_paragraph(err, *needles)


@pytest.mark.parametrize("argv, needles", [
    (["fit", "--config", "no/such.yaml"], ["no/such.yaml"]),
    (["fit", "--config", "."], ["."]),
    (["fit", L2_CONFIG], ["--config"]),
    (["fit"], ["model"]),
    (["train", "--config", L2_CONFIG], ["train"]),
    (["groups"], ["--config"]),
    (["groups", "--config", "no/such.yaml"], ["no/such.yaml"]),
    (["test", "--config", L2_CONFIG, "--ckpt_path=missing.ckpt"], ["missing.ckpt"]),
], ids=["missing-file", "folder-as-config", "no-config-flag", "no-config", "unknown-command", "groups-no-config",
        "groups-missing-file", "test-missing-checkpoint"])
def test_a_bad_command_line_stops_with_one_paragraph(argv, needles, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_paragraph(err, *needles)


SWEEP_FILES = {
    "duplicate-key": (b"method: grid\nmethod: random\n", ["line 2", "'method' is given twice"]),
    "not-utf8": ("method: grid  # größer\n".encode("latin-1"), ["not UTF-8"]),
    "empty": (b"", ["empty"]),
}


@pytest.mark.parametrize("case", sorted(SWEEP_FILES))
def test_a_bad_sweep_file_stops_with_one_paragraph(case, tmp_path, capsys):
    content, needles = SWEEP_FILES[case]
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)
    assert main(["sweep", str(path)]) == 2
    assert_one_paragraph(capsys.readouterr().err, str(path), *needles, prefix="regfit sweep")


def test_the_suite_covers_at_least_100_bad_configs():
    assert len(OVERRIDES) + len(FILES) + len(SWEEP_FILES) + 8 >= 100
