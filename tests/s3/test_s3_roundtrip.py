"""Checkpoints in a real S3-compatible server: save, restore, load, list, retention."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import aiockpt
from aiockpt._util.location import ObjectPath

from .s3server import keys


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_checkpoint_restore_load_and_list(s3_url, bucket, s3_client_):
    model = _model(0)
    optimizer = torch.optim.Adam(model.parameters())
    config = aiockpt.Config(directory=s3_url, keep_last=2, chunk_size_mb=0.01)
    assert isinstance(config.directory, ObjectPath)
    assert str(config.directory) == s3_url
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        for step in (1, 2, 3):
            model[0].weight.data += 1
            info = ckpt.checkpoint(step).wait()
            assert str(info.path) == f"{s3_url}/step-{step}"
    listed = aiockpt.list_checkpoints(s3_url)
    assert [i.step for i in listed] == [2, 3]  # retention kept the newest two
    assert all(i.nbytes > 0 for i in listed)
    stored = keys(s3_client_, bucket)
    assert not [k for k in stored if k.startswith("run-1/step-1/")]
    assert "run-1/latest" in stored
    assert "run-1/.aiockpt.lock" not in stored  # closed: the lock object is gone

    fresh = _model(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 3
    assert _equal(fresh, model)

    state = aiockpt.load(f"{s3_url}/step-3", keys=["model"])
    for name, value in model.state_dict().items():
        assert torch.equal(state["model"][name], value)
    with pytest.raises(aiockpt.NoCheckpointError):
        aiockpt.load(f"{s3_url}/step-1")


def test_partial_restore_reads_only_what_is_asked(s3_url):
    model, extra = _model(0), torch.nn.Linear(4, 4)
    config = aiockpt.Config(directory=s3_url)
    with aiockpt.SyncCheckpointer(config, model=model, extra=extra) as ckpt:
        ckpt.checkpoint(5).wait()
    fresh, fresh_extra = _model(1), torch.nn.Linear(4, 4)
    untouched = fresh_extra.weight.detach().clone()
    with aiockpt.SyncCheckpointer(config, model=fresh, extra=fresh_extra) as ckpt:
        assert ckpt.restore(only=["model"]) == 5
    assert _equal(fresh, model)
    assert torch.equal(fresh_extra.weight, untouched)
    layer = aiockpt.load(f"{s3_url}/step-5", layers=r"^model/0$")
    assert set(layer["model"]) == {"0.weight", "0.bias"}


def test_trainer_resumes_from_s3(s3_url):
    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).square().mean()

    config = aiockpt.Config(directory=s3_url, interval_steps=2, keep_last=2)
    batches = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    model = _model(0)
    with aiockpt.SyncTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                             config=config) as trainer:  # fmt: skip
        assert trainer.resume() == 0
        for batch in batches[:4]:
            trainer.train_step(batch)
    resumed = _model(1)
    with aiockpt.SyncTrainer(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1), loss_fn,
                             config=config) as trainer:  # fmt: skip
        assert trainer.resume() == 4
    assert _equal(resumed, model)


def test_saving_a_step_again_replaces_it_whole(s3_url, bucket, s3_client_):
    model = _model(0)
    config = aiockpt.Config(directory=s3_url)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        ckpt.checkpoint(3).wait()
        first = [k for k in keys(s3_client_, bucket, "run-1/step-3/") if ".data-" in k]
        model[0].weight.data += 1
        ckpt.checkpoint(3).wait()
    second = [k for k in keys(s3_client_, bucket, "run-1/step-3/") if ".data-" in k]
    assert first and second and not set(first) & set(second)  # the old attempt's data went
    state = aiockpt.load(f"{s3_url}/step-3")
    assert torch.equal(state["model"]["0.weight"], model[0].weight)


def test_a_resumed_run_drops_the_steps_it_abandoned(s3_url):
    model = _model(0)
    config = aiockpt.Config(directory=s3_url, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        for step in (1, 2, 3):
            ckpt.checkpoint(step).wait()
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        assert ckpt.restore(step=1) == 1
        ckpt.checkpoint(2).wait()  # the run goes on from step 1: its old 2 and 3 are gone
    assert [i.step for i in aiockpt.list_checkpoints(s3_url)] == [1, 2]


def test_bad_object_store_urls_are_config_errors():
    for url, problem in [
        ("s3://Bad_Bucket/x", "not a bucket name"),
        ("s3://bucket-1/a/../b", "'..' part"),
        ("s3://bucket-1/x?versionId=3", "no query"),
        ("gs://bucket-1/x", "no storage backend serves gs://"),
    ]:
        with pytest.raises(aiockpt.ConfigError, match=problem):
            aiockpt.Config(directory=url)


def test_without_the_s3_extra_an_s3_directory_says_what_to_install():
    # A real interpreter in which obstore cannot be imported (as without the extra).
    script = (
        "import sys; sys.modules['obstore'] = None\n"
        "import aiockpt\n"
        "try:\n"
        "    aiockpt.Config(directory='s3://bucket-1/run')\n"
        "except aiockpt.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install 'aiockpt[s3]'" in done.stdout


def test_toml_and_environment_take_s3_urls(tmp_path, monkeypatch):
    toml = tmp_path / "aiockpt.toml"
    toml.write_text('[checkpoint]\ndirectory = "s3://bucket-1/from-file"\n')
    assert str(aiockpt.Config.from_toml(toml).directory) == "s3://bucket-1/from-file"
    monkeypatch.setenv("AIOCKPT_DIRECTORY", "s3://bucket-1/from-env")
    config = aiockpt.Config.from_toml(toml)
    assert isinstance(config.directory, ObjectPath)
    assert config.to_dict()["directory"] == "s3://bucket-1/from-env"
