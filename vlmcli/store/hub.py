"""Talking to the Hugging Face Hub through huggingface-hub, with every failure turned into one line.

Downloads go through `hf_hub_download(local_dir=...)` into a folder inside the store, pinned to the
commit the revision resolved to, so all files of a pull come from one commit. What is resumable:
files finished by an earlier, interrupted pull are kept and not fetched again; a connection dropped
mid-file is resumed with a Range request by huggingface-hub itself; on the real Hub, Xet-backed files
go through hf_xet, which keeps its own chunk cache. After each download the file is checked against
the Hub's sha256 (LFS files) or git blob id (small files): a mismatch deletes it and fails the pull.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcli.errors import VlmError
from vlmcli.files import sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"


class HubError(VlmError):
    """The Hub could not give us what we asked for (network, auth, missing repo/file, bad checksum)."""


class ChecksumError(HubError):
    pass


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: the Hub's sha256 of the content
    git_oid: str | None  # the git blob id (sha1 of "blob <size>\0" + content)


@dataclass(frozen=True)
class RepoSnapshot:
    repo: str
    revision: str  # what was asked for (branch, tag or commit)
    commit: str  # the commit it resolved to
    files: dict[str, RemoteFile]


def endpoint() -> str:
    """HF_ENDPOINT read now (huggingface-hub reads it once at import; we pass it explicitly)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    """HF_TOKEN if set; None lets huggingface-hub use a token saved by `hf auth login`."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def token_source() -> str | None:
    """Where the token downloads would use comes from ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", or the
    file `hf auth login` saved), None if there is none. Never the token itself."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            return name
    from huggingface_hub import constants  # reads HF_HOME / HF_TOKEN_PATH; no network, no token read

    path = Path(constants.HF_TOKEN_PATH)
    with contextlib.suppress(OSError):
        if path.is_file() and path.stat().st_size > 0:
            return str(path)
    return None


# ---------------------------------------------------------------------------------------------
# Error translation. Class names are matched along the MRO so this works with whichever HTTP
# client the installed huggingface-hub uses (requests, httpx, httpx2).


def _mro_names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return int(code) if isinstance(code, int) else None


def _network_cause(e: BaseException) -> str | None:
    names = _mro_names(e)
    text = str(e).lower()
    if names & {"TimeoutException", "Timeout", "ReadTimeout", "ConnectTimeout", "TimeoutError"}:
        return "timed out"
    if names & {"ConnectError", "ConnectionError", "ProxyError", "ConnectionRefusedError"}:
        if "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
            return "host name not found"
        return "cannot connect"
    if names & {"RemoteProtocolError", "ReadError", "NetworkError", "ChunkedEncodingError", "ProtocolError"}:
        return "the connection dropped"
    return None


def explain(e: BaseException, repo: str, revision: str, filename: str | None = None) -> HubError | None:
    """One line for a failure met while talking to the Hub about repo@revision (and filename).

    None for a local file-system error (disk full, read-only store): the caller words those.
    """
    names = _mro_names(e)
    where = f"{repo}/{filename}" if filename else repo
    status = _status(e)
    host = endpoint()
    if "OfflineModeIsEnabled" in names:
        return HubError("offline mode is on (HF_HUB_OFFLINE=1), cannot download", where)
    if "GatedRepoError" in names:
        return HubError(
            f"this repository is gated: accept its terms at {host}/{repo} and set HF_TOKEN to a token with access",
            repo,
        )
    if "RevisionNotFoundError" in names:
        return HubError(f"revision {revision!r} not found in {repo}", repo)
    if names & {"RemoteEntryNotFoundError", "EntryNotFoundError"}:
        return HubError(f"file not found in {repo} at revision {revision}", where)
    if "RepositoryNotFoundError" in names:
        if status == 401:
            return HubError(f"repository not found on {host}, or it needs a login: set HF_TOKEN", repo)
        return HubError(f"repository not found on {host} (if it is private or gated, set HF_TOKEN)", repo)
    if "LocalEntryNotFoundError" in names and e.__cause__ is not None:
        inner = explain(e.__cause__, repo, revision, filename)
        if inner is not None:
            return inner
    net = _network_cause(e)
    if net is not None:
        return HubError(f"cannot download from {host}: {net}; check the network (or HF_ENDPOINT) and retry", where)
    if status is not None:
        if status == 401:
            return HubError(f"not authorized (HTTP 401) by {host}: set HF_TOKEN to a valid token", where)
        if status == 403:
            return HubError(
                f"access denied (HTTP 403) by {host}: the repository may be gated; set HF_TOKEN to a token with access",
                where,
            )
        if status == 404:
            return HubError(f"not found on {host} (HTTP 404)", where)
        if status == 429:
            return HubError(
                f"rate limited by {host} (HTTP 429); wait a little and retry (HF_TOKEN raises the limit)", where
            )
        if status >= 500:
            return HubError(f"the Hub at {host} failed with HTTP {status} (server error); retry later", where)
        return HubError(f"the Hub at {host} answered HTTP {status}", where)
    if "LocalEntryNotFoundError" in names:
        return HubError(f"cannot reach {host}; check the network (or HF_ENDPOINT) and retry", where)
    if "Consistency check failed" in str(e):
        return HubError("the download was incomplete (size mismatch); run the pull again", where)
    if isinstance(e, OSError):
        return None
    first_line = (str(e).strip().splitlines() or [""])[0]
    return HubError(f"download failed ({type(e).__name__}: {first_line})", where)


@contextlib.contextmanager
def hub_errors(repo: str, revision: str, filename: str | None = None) -> Iterator[None]:
    try:
        yield
    except VlmError:
        raise
    except Exception as e:  # every Hub/network failure becomes one line
        err = explain(e, repo, revision, filename)
        if err is None:
            raise
        raise err from e


# ---------------------------------------------------------------------------------------------


def fetch_snapshot(repo: str, revision: str) -> RepoSnapshot:
    """The repository's file list at `revision`, with sizes and checksums, and the commit it is at."""
    from huggingface_hub import HfApi

    with hub_errors(repo, revision):
        info = HfApi(endpoint=endpoint(), token=token()).model_info(repo, revision=revision, files_metadata=True)
    files: dict[str, RemoteFile] = {}
    for s in info.siblings or []:
        lfs = s.lfs
        files[s.rfilename] = RemoteFile(
            name=s.rfilename,
            size=(lfs.size if lfs else s.size),
            sha256=(lfs.sha256 if lfs else None),
            git_oid=s.blob_id,
        )
    commit = info.sha or revision
    return RepoSnapshot(repo=repo, revision=revision, commit=commit, files=files)


def _tqdm_class(progress: bool) -> Any:
    """huggingface-hub's bars when stderr is a terminal, a silent one otherwise (no \\r noise in logs)."""
    if progress:
        return None
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Silent(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def git_blob_oid(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(
    snapshot: RepoSnapshot, name: str, dest_dir: Path, *, progress: bool | None = None
) -> tuple[Path, str]:
    """Download one file of the snapshot into dest_dir, verify it, return (path, sha256)."""
    from huggingface_hub import hf_hub_download

    remote = snapshot.files.get(name)
    if remote is None:
        raise HubError(f"file not found in {snapshot.repo} at revision {snapshot.revision}", f"{snapshot.repo}/{name}")
    if progress is None:
        progress = sys.stderr.isatty()
    kwargs: dict[str, Any] = dict(
        repo_id=snapshot.repo,
        filename=name,
        revision=snapshot.commit,
        local_dir=str(dest_dir),
        endpoint=endpoint(),
        token=token(),
    )
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _tqdm_class(progress)
    with hub_errors(snapshot.repo, snapshot.revision, name):
        path = Path(hf_hub_download(**kwargs))
    _verify(path, remote, snapshot, dest_dir)
    return path, sha256_file(path)


def _verify(path: Path, remote: RemoteFile, snapshot: RepoSnapshot, dest_dir: Path) -> None:
    problem = None
    if remote.size is not None and path.stat().st_size != remote.size:
        problem = f"size {path.stat().st_size}, expected {remote.size}"
    elif remote.sha256:
        got = sha256_file(path)
        if got != remote.sha256.lower():
            problem = f"sha256 {got[:12]}..., the Hub says {remote.sha256[:12]}..."
    elif remote.git_oid and len(remote.git_oid) == 40:
        got = git_blob_oid(path)
        if got != remote.git_oid.lower():
            problem = f"git blob id {got[:12]}..., the Hub says {remote.git_oid[:12]}..."
    if problem is None:
        return
    # Delete the bad file and its download record so the next pull fetches it again.
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        (dest_dir / ".cache" / "huggingface" / "download" / f"{remote.name}.metadata").unlink()
    raise ChecksumError(
        f"checksum mismatch ({problem}): the download is corrupt, nothing was installed; run the pull again",
        f"{snapshot.repo}/{remote.name}",
    )
