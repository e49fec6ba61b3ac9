"""Hub uploads of pipeline folders: exactly the files a pipeline needs (never training state, logs,
pickles or anything that could hold a token), through huggingface_hub's ``HfApi``. The pipeline's own
``push_to_hub`` comes here; model cards live in ``hub``."""

from __future__ import annotations

import fnmatch
import logging
import os

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

# Relative paths (fnmatch patterns) that belong to a pipeline folder; everything else stays home.
UPLOAD_PATTERNS = (
    "model_index.json", "README.md", "pipeline.py", "checksums.json", "*.png",
    "*/config.json", "*/scheduler_config.json", "*/*.safetensors",
)  # fmt: skip
NEVER_UPLOAD = ("checkpoint-*", "*/checkpoint-*", "logs/*", ".tmp*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt",
                "*token*", ".cache/*", "*/.cache/*")  # fmt: skip


def files_to_upload(folder: str) -> list[str]:
    """The relative paths ``push_pipeline_folder`` uploads from ``folder``, sorted."""
    chosen = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "checkpoint-", "logs"))]
        for name in dirs + files:  # never upload through a link: its target may be anything (a private key)
            if os.path.islink(os.path.join(root, name)):
                raise ValueError(f"{os.path.join(root, name)} is a symbolic link; push uploads regular files only: "
                                 "replace the link by the file it points to, or remove it")  # fmt: skip
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if any(fnmatch.fnmatch(rel, p) for p in NEVER_UPLOAD):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in UPLOAD_PATTERNS):
                chosen.append(rel)
    return sorted(chosen)


def push_pipeline_folder(
    folder: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload DMMD pipeline",
    api: HfApi | None = None,
) -> list[str]:
    """Create ``repo_id`` (optionally private) and upload the pipeline files of ``folder``,
    optionally to branch ``revision``. The token is passed through, never written or logged."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"{folder} is not a pipeline folder (no model_index.json)")
    files = files_to_upload(folder)
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    api.upload_folder(
        folder_path=folder, repo_id=repo_id, allow_patterns=files, revision=revision,
        token=token, commit_message=commit_message,
    )  # fmt: skip
    logger.info("uploaded %d files of %s to %s%s", len(files), folder, repo_id, f"@{revision}" if revision else "")
    return files
