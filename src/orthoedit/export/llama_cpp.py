"""llama.cpp, pinned: its converter and its quantizer turn a transformers checkpoint into GGUF
files (docs/design.md, "GGUF export"). orthoedit converts nothing itself: the tokenizer, the
architecture's metadata and tensor names are llama.cpp's to get right, and llama.cpp's
runtime is what reads them.

The converter (``convert_hf_to_gguf.py``, its ``conversion/`` package and ``gguf-py``, the
gguf package of the same commit) comes from the llama-cpp-python sdist that the ``llama`` extra
pins (``LLAMA_CPP_PYTHON``), which vendors llama.cpp: fetched once from PyPI by pip into the
cache and checked against its sha256 (``SDIST_SHA256``), or found in a folder the user gives.
It runs in a subprocess of this Python (it imports torch, transformers, numpy and
sentencepiece) and writes F32, F16, BF16 and Q8_0 (its ``--outtype``). The other types are
written by llama.cpp's quantizer (``llama_model_quantize``, through an installed
llama-cpp-python) from a converted file in the checkpoint's own float type, in a subprocess too
(``export.quantizer``): llama.cpp logs to its process's standard error and aborts on some
errors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError

#: The llama-cpp-python release whose vendored llama.cpp converts (pyproject's ``llama`` extra
#: installs the same release, whose quantizer quantizes), and its sdist's sha256 on PyPI.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: Where the sdist keeps llama.cpp, and the parts of it the converter needs.
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
SCRIPT = "convert_hf_to_gguf.py"
KEPT = (SCRIPT, "LICENSE", "conversion/", "gguf-py/")
#: A folder with llama.cpp's converter (a checkout, an unpacked sdist) when no option names one.
ENV = "ORTHOEDIT_LLAMA_CPP"

#: Types the converter writes itself (``--outtype``).
CONVERTED = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
#: Types llama.cpp's quantizer writes without an importance matrix: the names of llama-quantize
#: (tools/quantize/quantize.cpp, QUANT_OPTIONS), each ``LLAMA_FTYPE_MOSTLY_<name>``.
QUANTIZED = (
    *("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L"),
    *("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS"),
)
#: Types whose tensors llama.cpp quantizes only with an importance matrix, which export does
#: not compute (src/llama-quant.cpp, tensor_requires_imatrix and the IQ3_XS mix).
NEED_IMATRIX = (
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ2_M",
    "IQ3_XXS",
    "IQ3_XS",
    "Q2_K_S",
)
TYPES = (*CONVERTED, *QUANTIZED)
#: The converter's input for the quantizer: the checkpoint's float type, kept exactly.
LOSSLESS = {"BF16": "BF16", "F16": "F16", "F32": "F32"}


def canonical_type(text: str) -> str:
    """``q4_k_m`` -> ``Q4_K_M``; a type export cannot write is one sentence naming the types."""
    kind = str(text).strip().upper()
    if kind in TYPES:
        return kind
    if kind in NEED_IMATRIX:
        raise ValueError(
            f"--type {kind} needs an importance matrix, which export does not compute; choose "
            f"one of {', '.join(QUANTIZED)}"
        )
    raise ValueError(
        f"--type {text!r} is not a type export writes: {', '.join(CONVERTED)} (llama.cpp's "
        f"converter) or {', '.join(QUANTIZED)} (llama.cpp's quantizer)"
    )


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_tools(types: list[str]) -> str | None:
    """What the requested types need that is not installed, as the sentence to print."""
    if not installed("sentencepiece"):
        return (
            "llama.cpp's converter imports sentencepiece, which is not installed: "
            "pip install 'orthoedit[export]'."
        )
    quantized = [t for t in types if t in QUANTIZED]
    if quantized and not installed("llama_cpp"):
        return (
            f"--type {quantized[0]} is written by llama.cpp's quantizer, which is not installed: "
            f"pip install 'orthoedit[llama]' (or export only {', '.join(CONVERTED)})."
        )
    return None


@dataclass(frozen=True)
class Converter:
    script: Path
    origin: str  # what it is, for the record and the card


def cache_dir() -> Path:
    """orthoedit's cache: ``$XDG_CACHE_HOME/orthoedit``, else ``~/.cache/orthoedit``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "orthoedit"


def _script_in(folder: Path) -> Path | None:
    for script in (folder / SCRIPT, folder / "vendor" / "llama.cpp" / SCRIPT):
        if script.is_file():
            return script
    return None


def find_converter(given: Path | None, log: Callable[[str], None] = print) -> Converter:
    """The converter in ``given`` (or ``$ORTHOEDIT_LLAMA_CPP``): a llama.cpp checkout or an
    unpacked llama-cpp-python sdist; else the pinned one in the cache, fetched on first use."""
    option = "--llama-cpp"
    if given is None and os.environ.get(ENV):
        given, option = Path(os.environ[ENV]), f"${ENV}"
    if given is not None:
        given = Path(given).expanduser()
        script = _script_in(given)
        if script is None:
            raise BadInputError(
                f"{option} {given}: no {SCRIPT} there (nor in vendor/llama.cpp/); give a "
                "llama.cpp checkout or an unpacked llama-cpp-python sdist."
            )
        return Converter(script.resolve(), _origin(given))
    folder = fetch_converter(cache_dir() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}", log)
    return Converter(
        folder / SCRIPT,
        f"llama.cpp's converter from llama-cpp-python {LLAMA_CPP_PYTHON} (PyPI sdist, sha256 "
        f"{SDIST_SHA256[:12]}…)",
    )


def _origin(folder: Path) -> str:
    """What a given converter is, without its local path (the record is published)."""
    info = folder / "PKG-INFO"
    if info.is_file():
        fields = dict(
            line.split(": ", 1)
            for line in info.read_text(errors="replace").splitlines()[:5]
            if ": " in line
        )
        if fields.get("Name", "").replace("_", "-") == "llama-cpp-python":
            return f"llama.cpp's converter from llama-cpp-python {fields.get('Version')} (sdist)"
    return "llama.cpp's converter from a local llama.cpp"


def fetch_converter(folder: Path, log: Callable[[str], None] = print) -> Path:
    """``folder`` holding the pinned converter: pip downloads the sdist from PyPI (once), its
    sha256 is checked, and the converter's files are unpacked; nothing is left on failure."""
    if (folder / SCRIPT).is_file():
        return folder
    log(
        f"fetching llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist, 77 MB, "
        f"once) into {folder}"
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.fetch-", dir=folder.parent) as tmp:
        sdist = download_sdist(Path(tmp))
        digest = _sha256(sdist)
        if digest != SDIST_SHA256:
            raise BadInputError(
                f"the downloaded {SDIST} has sha256 {digest}, not the pinned {SDIST_SHA256}; "
                f"nothing was kept. Give --llama-cpp PATH instead."
            )
        unpacked = Path(tmp) / "unpacked"
        unpack(sdist, unpacked)
        try:
            os.replace(unpacked, folder)
        except OSError:
            if not (folder / SCRIPT).is_file():  # not another process that got there first
                raise
    return folder


def download_sdist(dest: Path) -> Path:
    """pip downloads the pinned sdist into ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--dest", str(dest), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode or not (dest / SDIST).is_file():
        said = _reason(done.stderr or done.stdout) or f"exit {done.returncode}"
        raise BadInputError(
            f"cannot fetch llama.cpp's converter (pip download llama-cpp-python=="
            f"{LLAMA_CPP_PYTHON}: {said}); give --llama-cpp PATH (a llama.cpp checkout or the "
            "unpacked sdist)."
        )
    return dest / SDIST


def unpack(sdist: Path, dest: Path) -> None:
    """The converter's files of the sdist (``KEPT`` under ``VENDORED``) into ``dest``; regular
    files and folders only, every path inside ``dest``."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = member.name.removeprefix(VENDORED) if member.name.startswith(VENDORED) else None
            if not rel or not any(rel == k or rel.startswith(k) for k in KEPT):
                continue
            target = dest / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise BadInputError(f"{sdist}: unsafe path {member.name}; nothing was kept.")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    if not (dest / SCRIPT).is_file():
        raise BadInputError(f"{sdist} holds no {VENDORED}{SCRIPT}; nothing was kept.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(converter: Converter, model: Path, kind: str, dest: Path, name: str, log: Path) -> None:
    """llama.cpp's converter: the checkpoint in ``model`` as one GGUF of type ``kind``."""
    command = [sys.executable, str(converter.script), str(model), "--outtype", CONVERTED[kind]]
    command += ["--outfile", str(dest), "--model-name", name]
    run_logged(command, log, f"llama.cpp's converter could not convert {model} to {kind}")


def quantize(source: Path, dest: Path, kind: str, log: Path) -> None:
    """llama.cpp's quantizer: ``source`` (a converted float GGUF) as type ``kind``."""
    command = [sys.executable, "-m", "orthoedit.export.quantizer", str(source), str(dest), kind]
    run_logged(command, log, f"llama.cpp's quantizer could not write {kind}")


def run_logged(command: list[str], log: Path, failed: str) -> None:
    """Run ``command`` with its output in ``log``; a failure is one line: ``failed``, the
    reason the tool gave, and where its log is. An interrupt stops the tool too."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code:
        said = _reason(log.read_text(encoding="utf-8", errors="replace")) or f"exit {code}"
        raise BadInputError(f"{failed}: {said} (its log: {log}).")


_SAID = re.compile(r"(Error|Exception)\b.*:|^ERROR\b|\bfailed\b|\berror\b", re.IGNORECASE)


def _reason(text: str) -> str | None:
    """The last line of a tool's output that says what went wrong (a Python exception, a
    logged error), shortened to one line."""
    lines = [s.strip() for line in text.splitlines() for s in line.split("\r") if s.strip()]
    for line in reversed(lines):
        if _SAID.search(line):
            return line[:300]
    return lines[-1][:300] if lines else None
