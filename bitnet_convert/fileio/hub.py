"""Where a Hugging Face source lives on disk: a local folder as is, or a hub repo id through the local cache.

`huggingface_hub.snapshot_download` does the work and honours the usual environment: HF_HOME / HF_HUB_CACHE
for the cache, HF_HUB_OFFLINE to stay off the network (then only cached snapshots resolve), HF_TOKEN for
gated repos. Only the files a conversion needs are fetched (weights, config, tokenizer, the model card's
README.md), not other weight formats.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bitnet_convert.fileio.sources import shown
from bitnet_core.errors import ConvertError

# Files a conversion reads: config, weights and every tokenizer/chat-template file transformers may use.
# README.md: its front matter gives a GGUF's general.* keys (license, base model), as llama.cpp's converter reads it
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt", "README.md"]

# owner/name as the Hub spells repo ids (letters, digits, '-', '_', '.'; no '..' or leading/trailing '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and ".." not in src and not src.endswith(".")


def resolve_source(src: str, revision: str | None = None) -> Path:
    """A local folder, or the cached snapshot folder of hub repo `src` at `revision` (default: main).

    A path that exists locally always wins over a repo id of the same spelling.
    """
    local = Path(src).expanduser()
    try:
        is_dir, exists = local.is_dir(), local.exists()
    except OSError as exc:  # a path too long to look up, a folder we may not enter
        raise ConvertError(f"{shown(src)}: cannot look it up: {exc.strerror or exc}") from None
    if is_dir:
        if revision is not None:
            raise ConvertError(f"{src}: --revision applies to Hugging Face repo ids, not to a local folder")
        return local
    if exists:
        raise ConvertError(f"{src}: expected a folder or a Hugging Face repo id, found a file")
    if not looks_like_repo_id(src):
        raise ConvertError(f"{shown(src)}: no such folder (and not a Hugging Face repo id of the form owner/name)")
    return _download(src, revision)


def _missing(at: str, repo_id: str, hub_says: str) -> str:
    """The message for a repo id that is not on the hub or in the cache. A mistyped local path looks like a repo
    id: when its parent folder exists here it most likely is one, so the line says "no such folder" first."""
    parent = Path(repo_id).parent
    if parent.is_dir():
        return f"{shown(repo_id)}: no such folder ({parent}/ exists here: a mistyped folder name?); as a Hugging " \
               f"Face repo id, {at}: {hub_says}"
    return f"{at}: {hub_says}; no local folder of that name either"


def _download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except IncompleteSnapshotError:
        raise ConvertError(f"{at}: the cached snapshot is incomplete; download it again with network access") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ConvertError(_missing(at, repo_id, f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                        "and HF_HUB_OFFLINE is set")) from None
        raise ConvertError(_missing(at, repo_id, "cannot reach the Hugging Face Hub and the repo is not in the "
                                    "local cache")) from None
    except RevisionNotFoundError:
        raise ConvertError(f"{at}: no such revision on the Hugging Face Hub") from None
    except GatedRepoError:
        raise ConvertError(f"{repo_id}: gated repo; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConvertError(_missing(repo_id, repo_id, "no such repo on the Hugging Face Hub (or it is private: "
                                    "set HF_TOKEN)")) from None
    except (HfHubHTTPError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConvertError(f"{at}: download failed: {first_line}") from None
    return Path(folder)


def snapshot_revision(folder: str | os.PathLike) -> str | None:
    """The commit sha of a folder inside the hub cache (`.../snapshots/<sha>`), else None."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and _COMMIT.match(folder.name):
        return folder.name
    return None
