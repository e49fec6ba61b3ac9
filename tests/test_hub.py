"""Hub uploads against a stand-in for HfApi: exactly which files, and no token on disk or in logs."""

import logging
import os

import pytest

from latent_dmmd.hub import files_to_upload, push_pipeline_folder

from .conftest import tiny_pipeline

TOKEN = "hf_SECRETtokenValue123"


class FakeHfApi:
    """Records calls at the Hub API boundary instead of making them."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


@pytest.fixture
def run_folder(tmp_path):
    """A training output: the pipeline folder plus things that must never be uploaded."""
    out = tmp_path / "out"
    pipe = out / "pipeline"
    tiny_pipeline().save_pretrained(pipe)
    (pipe / "samples.png").write_bytes(b"\x89PNG fake")
    (pipe / "checkpoint-10").mkdir()
    (pipe / "checkpoint-10" / "optimizer.bin").write_bytes(b"state")
    (pipe / "logs").mkdir()
    (pipe / "logs" / "events.out.tfevents").write_bytes(b"log")
    (pipe / "discriminator" / "old.bin").write_bytes(b"pickle")
    (pipe / ".cache").mkdir()
    (pipe / ".cache" / "token").write_text("hf_x")
    return pipe


def test_exact_upload_list(run_folder):
    (run_folder / "README.md").write_text("card")
    assert files_to_upload(str(run_folder)) == [
        "README.md",
        "checksums.json",
        "discriminator/config.json",
        "discriminator/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "pipeline.py",
        "samples.png",
        "scheduler/scheduler_config.json",
    ]


def test_push_creates_private_repo_on_a_branch_and_uploads_only_pipeline_files(run_folder, caplog):
    api = FakeHfApi()
    with caplog.at_level(logging.DEBUG):
        files = push_pipeline_folder(str(run_folder), "me/dmmd", private=True, revision="v2", token=TOKEN, api=api)
    (create, repo, ckw), (branch, _, bkw), (upload, _, ukw) = api.calls
    assert (create, repo, ckw["private"], ckw["token"]) == ("create_repo", "me/dmmd", True, TOKEN)
    assert (branch, bkw["branch"]) == ("create_branch", "v2")
    assert upload == "upload_folder" and ukw["revision"] == "v2" and ukw["allow_patterns"] == files
    assert not any(f.startswith(("checkpoint-", "logs/", ".cache")) or f.endswith(".bin") for f in files)
    # the token went to the API only: not into any file of the folder, not into the logs
    assert TOKEN not in caplog.text
    for root, _, names in os.walk(run_folder):
        for name in names:
            assert TOKEN.encode() not in open(os.path.join(root, name), "rb").read()


def test_pipeline_push_to_hub_saves_then_uploads(tmp_path):
    api = FakeHfApi()
    files = tiny_pipeline().push_to_hub("me/dmmd", api=api)
    assert "discriminator/diffusion_pytorch_model.safetensors" in files and "pipeline.py" in files
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


def test_push_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="not a pipeline folder"):
        push_pipeline_folder(str(tmp_path), "me/x", api=FakeHfApi())


def test_loading_a_pinned_revision_passes_it_to_the_snapshot_download(tmp_path, monkeypatch):
    from latent_dmmd import DMMDPipeline
    from latent_dmmd.pipelines import pipeline_dmmd

    tiny_pipeline().save_pretrained(tmp_path / "snap")
    seen = {}
    monkeypatch.setattr(pipeline_dmmd, "snapshot_download", lambda repo, **kw: seen.update(kw, repo=repo) or str(tmp_path / "snap"))
    DMMDPipeline.from_pretrained("me/dmmd", revision="0123abc")
    assert seen["repo"] == "me/dmmd" and seen["revision"] == "0123abc"
