"""The Hugging Face Hub's failures as one-line errors, for every download of a model's files."""

from __future__ import annotations

from ..errors import BadInputError


def from_hub(
    repo_id: str,
    revision: str | None,
    fetch,
    *args,
    what: str,
    missing: str = "",
    local: str = "a local folder",
    **kwargs,
) -> str:
    """``fetch(repo_id, *args, revision=...)`` with the Hub's failures as one-line errors
    (``missing``: the message for a file the repository does not have; ``local``: what to
    pass instead when the Hub cannot be reached)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fetch(repo_id, *args, revision=revision, **kwargs)
    except GatedRepoError as err:
        raise BadInputError(f"{repo_id} is gated: accept its terms on the Hub and log in.") from err
    except RepositoryNotFoundError as err:
        raise BadInputError(f"{repo_id}: no such model on the Hub (or no access).") from err
    except RevisionNotFoundError as err:
        raise BadInputError(f"{repo_id}: revision {revision!r} not found.") from err
    except LocalEntryNotFoundError as err:
        raise BadInputError(
            f"{repo_id}: not in the local cache and the Hub cannot be reached; pass {local}."
        ) from err
    except EntryNotFoundError as err:  # after its subclass LocalEntryNotFoundError
        raise BadInputError(
            missing or f"{repo_id} has no config.json; is it a transformers model?"
        ) from err
    except HfHubHTTPError as err:
        raise BadInputError(f"{repo_id}: {what} failed ({err}).") from err
