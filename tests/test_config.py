"""Every config composes; typos fail naming the key; the real recipe holds what it claims."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import REPO, compose_config
from fahr.config.schema import validate
from fahr.tasks.schedules import scaled_lr

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def command_of(experiment: str) -> str:
    """The config an experiment file belongs to (its name says which task it is for)."""
    if "survival" in experiment or "deepsurv" in experiment:
        return "finetune_survival"
    if "faceage" in experiment and "pretrain" not in experiment:
        return "finetune_age"
    return "pretrain"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    # DeepSurv benchmark experiments get their tables from benchmarks/survival.py
    inputs = ["data.train=train.csv"] if "deepsurv" in experiment else []
    cfg = compose_config(command_of(experiment), [f"experiment={experiment}", *inputs])
    assert cfg.experiment_name == experiment
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("name", ["pretrain", "export", "demo"])
def test_every_command_config_composes(name):
    cfg = compose_config(name)
    assert cfg.trainer.max_steps > 0


@pytest.mark.parametrize("name, overrides", [
    ("finetune_age", []),
    ("finetune_age", ["experiment=demo_faceage"]),
    ("finetune_age", ["data=faceage_shards", "data.root=x"]),
    ("finetune_survival", ["experiment=demo_facesurvival"]),
    ("finetune_survival", ["data=table", "data.train=a.csv"]),
    ("finetune_survival", ["data.root=x"]),
])
def test_finetune_configs_compose_and_resolve(name, overrides):
    from omegaconf import OmegaConf

    cfg = compose_config(name, overrides)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_demo_is_the_demo_experiment():
    assert compose_config("demo").experiment_name == "demo_pretrain"


@pytest.mark.parametrize("override, key", [
    ("trainer.max_stesp=3", "max_stesp"),
    ("+trainer.max_stesp=3", "max_stesp"),
    ("data.batchsize=3", "batchsize"),
    ("model.arhc=vit_base", "arhc"),
])
def test_misspelt_override_fails_naming_the_key(override, key):
    from fahr.boundary import InputError

    with pytest.raises((ConfigCompositionException, ConfigKeyError, InputError)) as err:
        validate(compose_config("pretrain", [override]))
    assert key in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("pretrain", ["trainer.max_steps=ten"])
    assert "max_steps" in str(err.value) + str(err.value.__cause__)


def test_fahr_face_pretrain_is_the_real_recipe():
    cfg = compose_config("pretrain", ["experiment=fahr_face_pretrain"])
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.patch_size) == ("vit_base", 112, 16)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp"
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    effective = cfg.data.batch_size * world * cfg.trainer.accumulate_grad_batches
    assert effective == 4096
    assert scaled_lr(cfg.task.base_lr, effective) == pytest.approx(2.4e-3)
    assert cfg.data.samples_per_epoch == 42_000_000
    assert cfg.trainer.max_steps == 100 * 42_000_000 // 4096
    assert cfg.logger.wandb is not None
    assert cfg.data.train_shards.endswith("webface42m-{000000..004199}.tar")


def test_run_id_is_derived_from_config_not_time(tmp_path):
    from fahr.utils.run import derive_run_id, run_dir_for

    a = compose_config("pretrain", [f"paths.root_dir={tmp_path}"])
    b = compose_config("pretrain", [f"paths.root_dir={tmp_path / 'elsewhere'}", "logger=wandb"])
    c = compose_config("pretrain", ["trainer.max_steps=7"])
    assert derive_run_id(a) == derive_run_id(b)  # where it is written and how it is watched do not count
    assert derive_run_id(a) != derive_run_id(c)
    assert run_dir_for(a) == tmp_path / "runs" / "default" / derive_run_id(a)
    named = compose_config("pretrain", ["run_id=my-run"])
    assert run_dir_for(named).name == "my-run"


@pytest.mark.parametrize("command", ["pretrain", "finetune_age", "finetune_survival"])
def test_run_id_ignores_display_settings_so_a_resubmission_resumes(command):
    from fahr.utils.run import derive_run_id

    base = derive_run_id(compose_config(command))
    shown = compose_config(command, ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=7",
                                     "logger=wandb"])
    assert derive_run_id(shown) == base
    assert derive_run_id(compose_config(command, ["seed=7"])) != base  # what is trained still counts


def test_cli_help_lists_commands_without_importing_torch():
    code = ("import sys; from fahr.cli.main import main; main(['--help']); "
            "bad = [m for m in ('torch', 'lightning', 'timm') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    for command in ("shards", "pretrain", "export", "finetune-age", "finetune-survival", "predict", "far",
                    "evaluate", "demo"):
        assert command in out.stdout


def test_cli_unknown_command_fails():
    out = subprocess.run([sys.executable, "-m", "fahr.cli.main", "pretrian"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "unknown command 'pretrian'" in out.stderr


def test_cli_typo_fails_naming_the_key():
    out = subprocess.run([sys.executable, "-m", "fahr.cli.main", "pretrain", "trainer.max_stesp=3"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "max_stesp" in out.stderr


def test_configs_ship_as_package_data():
    from importlib.resources import files

    assert (Path(str(files("fahr.conf"))) / "pretrain.yaml").is_file()
