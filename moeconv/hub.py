"""Publishing a converted model on the Hugging Face Hub.

Most users meet a moeconv model through its Hub repository, so an upload must
never publish a damaged or half-written conversion: :func:`upload_folder`
verifies the folder with the reference reader (every checksum) and checks the
model card's front matter *before* any network call, then creates the repository
if needed and pushes every file in a single commit (large files go through LFS
or Xet, as the installed ``huggingface_hub`` decides).

Every failure is an :class:`UploadError` whose message is one line saying what to
do, so the command line can print it as is.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "UploadError",
    "CardError",
    "Uploaded",
    "check_push_target",
    "check_conversion",
    "validate_model_card",
    "upload_folder",
]

#: Files every complete conversion has (the model card included: it is what the Hub shows).
REQUIRED_FILES = ("config.json", "model.safetensors.index.json", "README.md")
DEFAULT_COMMIT_MESSAGE = "Upload model quantized with moeconv"
_PIPELINE_TAG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


class UploadError(RuntimeError):
    """An upload that cannot or must not happen; the message is one line and names the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class CardError(ValueError):
    """A model card whose YAML front matter the Hub would reject or misread."""


@dataclass(frozen=True)
class Uploaded:
    """Where an upload landed."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: tuple[str, ...]


def check_push_target(repo_id: str, token: str | None = None) -> str:
    """Check the repository id, offline mode and the token, without any network call; returns the token.

    ``moeconv convert --push-to-hub`` calls this before converting, so a typo or a
    missing login is reported in a second rather than after the conversion.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UploadError(f"malformed repo id {repo_id!r}: {err}") from None
    if repo_id.count("/") != 1:
        raise UploadError(f"malformed repo id {repo_id!r}: expected 'namespace/name', e.g. 'my-org/Mixtral-8x7B-nf4'")
    if hf_constants.is_offline_mode():
        raise UploadError("HF_HUB_OFFLINE is set: unset it to upload to the Hub")
    token = token or huggingface_hub.get_token()
    if not token:
        raise UploadError(
            "no Hugging Face token found: set HF_TOKEN or run `hf auth login` with a token that has write access"
        )
    return token


def validate_model_card(path: str | os.PathLike) -> ModelCard:
    """Parse a ``README.md`` with huggingface_hub's card classes and check what the Hub relies on.

    The Hub reads ``library_name`` and ``tags`` to show how to load the model, and
    ``base_model`` with ``base_model_relation: quantized`` to list it under the
    original's quantizations; a card that breaks these is published silently wrong,
    so it is refused here.  Raises :class:`CardError` naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CardError(f"{path}: cannot read the model card: {err}") from None
    if not text.lstrip().startswith("---"):
        raise CardError(f"{path}: the model card has no YAML front matter (a block between '---' lines at the top)")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (yaml.YAMLError, ValueError, TypeError) as err:
        raise CardError(f"{path}: invalid YAML front matter: {err}") from None
    meta = card.data.to_dict()

    def fail(field: str, problem: str):
        raise CardError(f"{path}: front matter field {field!r} {problem}")

    if not isinstance(meta.get("library_name"), str) or not meta["library_name"]:
        fail("library_name", "must be a non-empty string")
    tags = meta.get("tags")
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
        fail("tags", "must be a non-empty list of strings")
    base = meta.get("base_model")
    relation = meta.get("base_model_relation")
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        if not bases or not all(_is_repo_id(b) for b in bases):
            fail("base_model", f"must be a Hub repo id or a list of them, got {base!r}")
        if relation != "quantized":
            fail("base_model_relation", f"must be 'quantized' for a moeconv model, got {relation!r}")
    elif relation is not None:
        fail("base_model_relation", "is set but 'base_model' is missing")
    tag = meta.get("pipeline_tag")
    if tag is not None and not (isinstance(tag, str) and _PIPELINE_TAG.fullmatch(tag)):
        fail("pipeline_tag", f"must be a task name such as 'text-generation', got {tag!r}")
    return card


def _is_repo_id(value) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return isinstance(value, str)


def check_conversion(folder: str | os.PathLike) -> list[str]:
    """Refuse a folder that is not a complete, intact conversion; returns the files to upload.

    Runs the reference reader's full verification (config, index, structure and
    every checksum) and validates the model card.
    Hidden files and folders (a resume journal, editor files) are not uploaded.
    """
    from moeconv_numpy import FormatError, open_model

    folder = Path(folder)
    if not folder.is_dir():
        raise UploadError(f"{folder}: not a directory; give the OUT folder of `moeconv convert`")
    redo = "re-run `moeconv convert` (it resumes) and upload again"
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UploadError(f"{folder} is not a complete moeconv conversion: missing {', '.join(missing)}; {redo}")
    try:
        with open_model(folder) as model:
            model.verify()
    except FormatError as err:
        raise UploadError(f"refusing to upload a damaged conversion: {err}; {redo}") from None
    try:
        validate_model_card(folder / "README.md")
    except CardError as err:
        raise UploadError(f"refusing to upload: {err}; fix README.md or re-run `moeconv convert`") from None
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> Uploaded:
    """Verify ``folder`` and publish it as ``repo_id`` in one commit.

    The repository is created if it does not exist (``private`` applies then; an
    existing repository keeps its visibility), and a ``revision`` branch is
    created from ``main`` if it does not exist.  Everything that can be checked
    locally is checked before the first request.
    """
    token = check_push_target(repo_id, token)
    files = check_conversion(folder)
    branch = revision or "main"
    api = HfApi(token=token)
    with _hub_errors(api.endpoint, repo_id, branch):
        # private=None (not False) leaves a new repo to the namespace's default visibility.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name)) for name in files]
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, revision=branch
        )
    return Uploaded(repo_id, branch, info.oid, info.commit_url, tuple(files))


def _is_network_error(err: BaseException) -> bool:
    """True when ``err`` or its causes is a connection failure.

    Checked on the OS-level cause (refused, reset, timed out, DNS failure) so that it
    holds whichever HTTP library the installed huggingface_hub is built on.
    """
    while err is not None:
        if isinstance(err, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def _hub_errors(endpoint: str, repo_id: str, branch: str) -> Iterator[None]:
    """Turn the client's exceptions into one-line :class:`UploadError` messages."""
    namespace = repo_id.split("/")[0]
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        text = err.server_message or str(err)
        detail = text.splitlines()[0] if text else ""
        if status == 401:
            raise UploadError(
                f"the Hub at {endpoint} rejected the token (401 Unauthorized): check HF_TOKEN or run `hf auth login`"
            ) from None
        if status == 403:
            raise UploadError(
                f"no permission to write to {repo_id} (403 Forbidden): the token needs write access to "
                f"the {namespace!r} namespace ({detail})"
            ) from None
        raise UploadError(f"the Hub at {endpoint} refused the upload to {repo_id}@{branch} ({status}): {detail}") from None
    except Exception as err:
        if _is_network_error(err):
            raise UploadError(
                f"cannot reach the Hub at {endpoint}: {err}; check the network connection (and HF_ENDPOINT or proxy settings)"
            ) from None
        raise
