"""Dequantised copies of GGUF models, so a GGUF file is dequantised once, not at every load.

transformers' GGUF reader dequantises every tensor and converts the tokenizer on each load (about
50 s for the embedded SmolLM2 on a 2-core CPU). The first load of a ``.gguf`` file writes the
dequantised model (fp32 safetensors, config, tokenizer) to ``<cache>/models/<key>/``; later loads read
that folder (about a second). The key covers the file's resolved path, size and modification time and
the transformers version, so a changed file or reader is dequantised again. The folder appears by an
atomic rename, so a crash or a second process never leaves a half-written copy in use.

The copy's config records where it came from under ``fastrome_gguf_source`` (the GGUF loader's
``quantization_config``), and :func:`fastrome.fingerprint.config_digest` reads it as that field: a
model loaded from the copy has the fingerprint of the same model loaded from the GGUF file, so
statistics and templates cached for one serve the other.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from fastrome.fingerprint import GGUF_SOURCE_KEY as SOURCE_KEY

_log = logging.getLogger(__name__)


def cache_folder(gguf: Path, root: Path) -> Path:
    """Where the dequantised copy of ``gguf`` lives under the cache ``root``."""
    import transformers

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    return root / "models" / f"{gguf.stem}-{key.hexdigest()[:16]}"


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def write_copy(model: Any, tokenizer: Any, folder: Path) -> Optional[Path]:
    """Write ``model`` (loaded from a GGUF file) and ``tokenizer`` as a plain safetensors folder at
    ``folder``; returns it, or None with one warning when it cannot be written (the load goes on)."""
    from safetensors.torch import save_model

    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        config = copy.deepcopy(model.config)
        source = getattr(config, "quantization_config", None)
        if source is not None:
            delattr(config, "quantization_config")  # the copy is plain fp32, not a GGUF-quantised model
            setattr(config, SOURCE_KEY, source.to_dict() if hasattr(source, "to_dict") else dict(source))
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):  # another process's complete copy wins; anything else is an error
                raise
    except Exception as exc:  # a read-only or full disk must not stop the load
        _log.warning("model cache: could not keep a dequantised copy in %s (%s); the GGUF file will be "
                     "dequantised again next time", folder, exc)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
