"""What the source model's license asks of a derivative: carried into the card and checked by push.

Keyed by the ``license`` (or ``license_name`` for ``license: other``) field of the source
model's card, as the Hub spells it. Each entry paraphrases the redistribution duties of that
license; the license text itself (the source's ``LICENSE`` file, copied by apply) is what
binds. A license not listed here gets a generic line pointing at the source's terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Terms:
    title: str
    link: str | None
    duties: tuple[str, ...]
    #: Text the derivative must display (shown at the top of the card).
    display: str | None = None
    #: The derivative's name must begin with this (checked by push, case-insensitive).
    name_prefix: str | None = None
    #: Text the license asks to be kept in a "Notice" file.
    notice: str | None = None
    files: tuple[str, ...] = field(default=("LICENSE",))


def _llama3x(version: str, link: str) -> Terms:
    return Terms(
        title=f"Llama {version} Community License",
        link=link,
        duties=(
            "Provide a copy of the license agreement with the model (the `LICENSE` file).",
            "Display “Built with Llama” prominently in the model's documentation.",
            "Begin the name of the derived model with “Llama”.",
            "Keep the attribution notice below in a “Notice” text file.",
            "Use is subject to the Llama Acceptable Use Policy (`USE_POLICY.md`).",
        ),
        display="Built with Llama",
        name_prefix="Llama",
        notice=f"Llama {version} is licensed under the Llama {version} Community License, "
        "Copyright © Meta Platforms, Inc. All Rights Reserved.",
        files=("LICENSE", "USE_POLICY.md"),
    )


LICENSES: dict[str, Terms] = {
    "llama2": Terms(
        title="Llama 2 Community License",
        link="https://ai.meta.com/llama/license/",
        duties=(
            "Provide a copy of the license agreement with the model (the `LICENSE` file).",
            "Keep the attribution notice below in a “Notice” text file.",
            "Use is subject to the Llama 2 Acceptable Use Policy (`USE_POLICY.md`).",
        ),
        notice="Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta "
        "Platforms, Inc. All Rights Reserved.",
        files=("LICENSE", "USE_POLICY.md"),
    ),
    "llama3": Terms(
        title="Meta Llama 3 Community License",
        link="https://llama.meta.com/llama3/license/",
        duties=(
            "Provide a copy of the license agreement with the model (the `LICENSE` file).",
            "Display “Built with Meta Llama 3” prominently in the model's documentation.",
            "Begin the name of the derived model with “Llama 3”.",
            "Keep the attribution notice below in a “Notice” text file.",
            "Use is subject to the Meta Llama 3 Acceptable Use Policy (`USE_POLICY.md`).",
        ),
        display="Built with Meta Llama 3",
        name_prefix="Llama-3",
        notice="Meta Llama 3 is licensed under the Meta Llama 3 Community License, Copyright © "
        "Meta Platforms, Inc. All Rights Reserved.",
        files=("LICENSE", "USE_POLICY.md"),
    ),
    "llama3.1": _llama3x("3.1", "https://llama.meta.com/llama3_1/license/"),
    "llama3.2": _llama3x("3.2", "https://www.llama.com/llama3_2/license/"),
    "llama3.3": _llama3x("3.3", "https://www.llama.com/llama3_3/license/"),
    "gemma": Terms(
        title="Gemma Terms of Use",
        link="https://ai.google.dev/gemma/terms",
        duties=(
            "Pass on the use restrictions of the Gemma Prohibited Use Policy as an enforceable "
            "provision to everyone you distribute the model to, and tell them it is subject "
            "to those restrictions.",
            "Provide a copy of the Gemma Terms of Use.",
            "Mark modified files as modified (this card states what was changed).",
            "Accompany distributions with a “Notice” text file holding the notice below.",
        ),
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms",
        files=(),
    ),
    "qwen": Terms(
        title="Qwen License Agreement",
        link=None,
        duties=(
            "Provide a copy of the license agreement (the `LICENSE` file).",
            "Display “Built with Qwen” or “Improved using Qwen” in the model's documentation.",
            "Large-scale commercial use needs a separate license from Alibaba Cloud.",
        ),
        display="Built with Qwen",
    ),
    "qwen-research": Terms(
        title="Qwen Research License Agreement",
        link=None,
        duties=(
            "Non-commercial research use only, unless Alibaba Cloud grants a commercial license.",
            "Provide a copy of the license agreement (the `LICENSE` file).",
            "Display “Built with Qwen” or “Improved using Qwen” in the model's documentation.",
        ),
        display="Built with Qwen",
    ),
    "apache-2.0": Terms(
        title="Apache License 2.0",
        link="https://www.apache.org/licenses/LICENSE-2.0",
        duties=(
            "Provide a copy of the license.",
            "Mark modified files as modified (this card states what was changed).",
            "Keep the source's NOTICE file, if it has one.",
        ),
        files=(),
    ),
    "mit": Terms(
        title="MIT License",
        link="https://opensource.org/license/mit",
        duties=("Keep the copyright and permission notice (the `LICENSE` file).",),
    ),
}


def license_id(metadata: dict) -> str | None:
    """The license key of a card's metadata: ``license``, or ``license_name`` when it is
    ``other``."""
    value = metadata.get("license")
    if value == "other":
        value = metadata.get("license_name") or value
    return str(value).lower() if value else None


def terms_for(metadata: dict) -> Terms | None:
    key = license_id(metadata)
    return LICENSES.get(key) if key else None


def name_problem(repo_id: str, metadata: dict) -> str | None:
    """Why a repo name breaks the license's naming duty, or None."""
    terms = terms_for(metadata)
    if terms is None or terms.name_prefix is None:
        return None
    name = repo_id.rsplit("/", 1)[-1]
    if name.lower().startswith(terms.name_prefix.lower()):
        return None
    return (
        f"the {terms.title} asks derived models to have names that begin with "
        f"“{terms.name_prefix}”, and {name!r} does not"
    )
